"""Stand-in k-diffusion sampling: a VP model wrapped to output denoised x0 (x = x0 + sigma * eps), Euler."""
import torch

from modules.sd_samplers_common import Sampler
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class CompVisDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        self.log_sigmas = ((1 - model.alphas_cumprod) / model.alphas_cumprod).sqrt().log()

    def sigma_to_t(self, sigma):
        """Fractional timestep by linear interpolation in log sigma."""
        log_sigma = sigma.log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        return (idx - 1) + (log_sigma - lo) / (hi - lo)

    def get_sigmas(self, n):
        t = torch.linspace(len(self.log_sigmas) - 1, 0, n)
        return torch.cat([self.log_sigmas.exp()[t.round().long()], torch.zeros(1)])

    def forward(self, x, sigma, **kwargs):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        eps = self.inner_model.apply_model(x * c_in[:, None, None, None], self.sigma_to_t(sigma), **kwargs)
        return x - eps * sigma[:, None, None, None]


class CFGDenoiserKDiffusion(CFGDenoiser):
    model_class = CompVisDenoiser


class KDiffusionSampler(Sampler):
    denoiser_class = CFGDenoiserKDiffusion

    def __init__(self, sd_model):
        super().__init__(sd_model)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def sample(self, p, noise, conditioning, unconditional_conditioning, image_conditioning):
        sigmas = self.model_wrap.get_sigmas(p.steps)
        self.prepare(p, conditioning, unconditional_conditioning, image_conditioning)
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i].expand(x.shape[0])
            denoised = self.model_wrap_cfg(x, sigma, **self.sampler_extra_args)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x
