"""Stand-in for modules/scripts.py: the Script base class and the always-visible part of ScriptRunner."""
AlwaysVisible = object()


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


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

    def postprocess_image(self, p, pp, *args):
        pass


class ScriptRunner:
    """As the WebUI's for always-visible scripts: process_images calls each one's process(p, *its args) before
    sampling, postprocess_image(p, pp, *its args) with each decoded image before its infotext is written, and
    postprocess(p, processed, *its args) after; X/Y/Z plot's cells are process_images calls of copies of p that
    share p.scripts."""

    def __init__(self, alwayson):
        self.alwayson = list(alwayson)  # [(script, its script_args)]

    def process(self, p):
        for script, args in self.alwayson:
            script.process(p, *args)

    def postprocess(self, p, processed):
        for script, args in self.alwayson:
            script.postprocess(p, processed, *args)

    def postprocess_image(self, p, pp):
        for script, args in self.alwayson:
            script.postprocess_image(p, pp, *args)
