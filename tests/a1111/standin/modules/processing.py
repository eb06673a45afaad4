"""Stand-in for modules/processing.py: txt2img with n_iter x batch_size images, infotexts built after sampling."""
import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from modules import prompt_parser, sd_samplers_common, shared
from modules.sd_samplers_kdiffusion import KDiffusionSampler
from modules.sd_samplers_timesteps import CompVisSampler

SAMPLERS = {"Euler": KDiffusionSampler, "DDIM": CompVisSampler}


@dataclass
class StableDiffusionProcessingTxt2Img:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 6
    cfg_scale: float = 7.5
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str = "Euler"
    s_min_uncond: float = 0.0
    sd_model: Optional[object] = None
    extra_generation_params: dict = field(default_factory=dict)
    comments: dict = field(default_factory=dict)
    is_hr_pass: bool = False
    enable_hr: bool = False
    iteration: int = 0
    prompts: list = field(default_factory=list)
    scripts: Optional[object] = None

    def comment(self, text):
        self.comments[text] = 1


@dataclass
class Processed:
    images: list
    infotexts: list
    comments: str = ""

    @property
    def info(self):
        return self.infotexts[0]


def create_infotext(p, iteration=0, position_in_batch=0):
    index = iteration * p.batch_size + position_in_batch
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.seed + index,
              **p.extra_generation_params}
    for key, value in params.items():
        if callable(value):
            try:
                params[key] = value(**locals())
            except Exception:
                params[key] = None
    return p.prompts[position_in_batch] + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def quote(value):
    """Values holding a comma, colon or newline are written JSON-quoted, as the WebUI does."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def process_images(p):
    model = p.sd_model or shared.sd_model
    images, infotexts = [], []
    forge = sd_samplers_common.running_forge()
    with torch.inference_mode() if forge else torch.no_grad():  # A1111: no_grad; Forge: inference_mode
        for iteration in range(p.n_iter):
            p.iteration = iteration
            p.prompts = [p.prompt] * p.batch_size
            seeds = [p.seed + iteration * p.batch_size + i for i in range(p.batch_size)]
            noise = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
            cond = prompt_parser.get_multicond_learned_conditioning(model, p.prompts, p.steps)
            uncond = None if forge and p.cfg_scale == 1 else \
                prompt_parser.get_learned_conditioning(model, [p.negative_prompt] * p.batch_size, p.steps)  # Forge: none at CFG 1
            sampler = SAMPLERS[p.sampler_name](model)
            if forge:  # Forge resets its model objects before every sampling
                model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
            image_cond = torch.zeros(p.batch_size, 5, 1, 1)
            samples = sampler.sample(p, noise, cond, uncond, image_cond)
            if p.enable_hr:  # A1111's hires fix: a second sampling of the same p, flagged while it runs
                p.is_hr_pass = True
                samples = SAMPLERS[p.sampler_name](model).sample(p, samples, cond, uncond, image_cond)
                p.is_hr_pass = False
            for i in range(p.batch_size):
                images.append(samples[i])
                infotexts.append(create_infotext(p, iteration, i))
    return Processed(images, infotexts, "".join(f"{c}\n" for c in p.comments))
