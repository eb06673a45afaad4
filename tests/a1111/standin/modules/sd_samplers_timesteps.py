"""Stand-in timestep sampling (DDIM): the inner model outputs eps and `sigma` carries the timestep."""
import torch

from modules.sd_samplers_common import Sampler
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(CFGDenoiser):
    model_class = CompVisTimestepsDenoiser


class CompVisSampler(Sampler):
    denoiser_class = CFGDenoiserTimesteps

    def __init__(self, sd_model):
        super().__init__(sd_model)
        self.alphas = sd_model.alphas_cumprod

    def timesteps(self, steps):
        return (torch.arange(steps, 0, -1) * (len(self.alphas) // steps) - 1).clamp(min=0)

    def sample(self, p, noise, conditioning, unconditional_conditioning, image_conditioning):
        self.prepare(p, conditioning, unconditional_conditioning, image_conditioning)
        ts = self.timesteps(p.steps)
        x = noise
        for i, t in enumerate(ts):
            eps = self.model_wrap_cfg(x, t.expand(x.shape[0]).float(), **self.sampler_extra_args)
            a = self.alphas[t]
            a_next = self.alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x
