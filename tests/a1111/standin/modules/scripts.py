"""Stand-in for modules/scripts.py: the Script base class and the always-visible part of ScriptRunner."""
AlwaysVisible = object()


class Script:
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def after_component(self, component, **kwargs):
        pass

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    """As the WebUI's for always-visible scripts: process_images calls each one's process(p, *its args) before
    sampling and postprocess(p, processed, *its args) after; X/Y/Z plot's cells are process_images calls of
    copies of p that share p.scripts."""

    def __init__(self, alwayson):
        self.alwayson = list(alwayson)  # [(script, its script_args)]

    def process(self, p):
        for script, args in self.alwayson:
            script.process(p, *args)

    def postprocess(self, p, processed):
        for script, args in self.alwayson:
            script.postprocess(p, processed, *args)
