"""Stand-in for modules/sd_samplers_common.py."""
import importlib.util


def running_forge() -> bool:
    """The stand-in plays Forge when tests/a1111/standin_forge is on sys.path (the `forge` fixture)."""
    return importlib.util.find_spec("modules_forge") is not None


class InterruptedException(BaseException):
    pass


class Sampler:
    """What both sampler families share: the CFG denoiser and the extra args it is called with."""
    denoiser_class = None  # the family's CFG denoiser

    def __init__(self, sd_model):
        self.model_wrap_cfg = self.denoiser_class(self)

    def prepare(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.model_wrap_cfg.p, self.model_wrap_cfg.total_steps = p, p.steps
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                                   "cond_scale": p.cfg_scale, "s_min_uncond": p.s_min_uncond}
