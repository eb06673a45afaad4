"""Stand-in for modules/processing.py: txt2img with n_iter x batch_size images, infotexts built after sampling."""
import json
from dataclasses import dataclass, field
from typing import Optional

import torch
from PIL import Image

from modules import prompt_parser, scripts, sd_samplers_common, shared
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
    width: Optional[int] = None   # None: the loaded model's image size
    height: Optional[int] = None
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
    seeds: list = field(default_factory=list)
    all_prompts: list = field(default_factory=list)
    all_seeds: list = field(default_factory=list)
    scripts: Optional[object] = None

    def comment(self, text):
        self.comments[text] = 1


@dataclass
class Processed:
    images: list
    infotexts: list
    comments: str = ""
    all_prompts: list = field(default_factory=list)
    all_seeds: list = field(default_factory=list)
    job_timestamp: str = ""
    batch_size: int = 1

    @property
    def info(self):
        return self.infotexts[0]

    def js(self):
        """What the WebUI puts into the hidden generation-info textbox (a subset of its keys)."""
        return json.dumps({"prompt": self.all_prompts[0] if self.all_prompts else "", "all_prompts": self.all_prompts,
                           "all_seeds": self.all_seeds, "job_timestamp": self.job_timestamp,
                           "infotexts": self.infotexts}, default=lambda o: None)

    def infotext(self, p, index):
        """As the WebUI's Processed.infotext: iteration and position passed, index computed inside."""
        return create_infotext(p, self.all_prompts, self.all_seeds, [], comments=[],
                               position_in_batch=index % self.batch_size, iteration=index // self.batch_size)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """As the WebUI's: callables in extra_generation_params get locals(), and for the images of a batch the
    WebUI passes the batch's own prompt list with index = position in that batch (iteration stays 0)."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": all_seeds[index],
              **p.extra_generation_params}
    for key, value in params.items():
        if callable(value):
            try:
                params[key] = value(**locals())
            except Exception:
                params[key] = None
    return all_prompts[index] + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def quote(value):
    """Values holding a comma, colon or newline are written JSON-quoted, as the WebUI does."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def process_images(p):
    model = p.sd_model or shared.sd_model
    images, infotexts = [], []
    forge = sd_samplers_common.running_forge()
    p.height, p.width = (p.height or model.image_size[0]), (p.width or model.image_size[1])
    p.all_prompts = [p.prompt] * (p.n_iter * p.batch_size)
    p.all_seeds = [p.seed + i for i in range(p.n_iter * p.batch_size)]
    if p.scripts is not None:
        p.scripts.process(p)
    with torch.inference_mode() if forge else torch.no_grad():  # A1111: no_grad; Forge: inference_mode
        for iteration in range(p.n_iter):
            p.iteration = iteration
            p.prompts = p.all_prompts[iteration * p.batch_size:(iteration + 1) * p.batch_size]
            p.seeds = p.all_seeds[iteration * p.batch_size:(iteration + 1) * p.batch_size]
            seeds = p.seeds
            noise = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
            size = dict(width=p.width, height=p.height)
            cond = prompt_parser.get_multicond_learned_conditioning(
                model, prompt_parser.SdConditioning(p.prompts, **size), p.steps)
            uncond = None if forge and p.cfg_scale == 1 else prompt_parser.get_learned_conditioning(  # Forge: none at CFG 1
                model, prompt_parser.SdConditioning([p.negative_prompt] * p.batch_size, True, **size), p.steps)
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
                if p.scripts is not None:  # the decoded image (the tiny model works in pixels), before its infotext
                    pixels = ((samples[i].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                    p.scripts.postprocess_image(p, scripts.PostprocessImageArgs(Image.fromarray(pixels)))
                infotexts.append(create_infotext(p, p.prompts, p.seeds, [], index=i))  # as the WebUI: index in batch
    shared.state.job_timestamp = getattr(shared.state, "job_timestamp", 0) + 1
    processed = Processed(images, infotexts, "".join(f"{c}\n" for c in p.comments), list(p.all_prompts),
                          list(p.all_seeds), str(shared.state.job_timestamp), p.batch_size)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
