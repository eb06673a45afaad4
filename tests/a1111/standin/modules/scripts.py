"""Stand-in for modules/scripts.py: the dropdown Script base class."""
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
