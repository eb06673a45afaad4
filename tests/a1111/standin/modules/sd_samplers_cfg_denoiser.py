"""Stand-in for the WebUI's CFG denoiser: row layout, callbacks, skipped-uncond copies, AND combination, SDXL dicts."""
import torch

from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoisedParams, CFGDenoiserParams, cfg_denoised_callback, cfg_denoiser_callback
from modules.shared import opts, state


def catenate_conds(conds):
    """SDXL's dict conds are concatenated key by key."""
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler, self.p, self.model_wrap = sampler, None, None
        self.step, self.total_steps = 0, None

    model_class = None  # the family's wrapper around shared.sd_model

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = self.model_class(shared.sd_model)
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted:
            raise sd_samplers_common.InterruptedException
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        if sd_samplers_common.running_forge():
            return self.forward_forge(x, sigma, uncond, conds_list, tensor, cond_scale, s_min_uncond, image_cond)
        batch = len(conds_list)
        counts = [len(c) for c in conds_list]
        x_in = torch.cat([x[i:i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(counts)] + [x])
        sigma_in = torch.cat([sigma[i:i + 1].expand(n) for i, n in enumerate(counts)] + [sigma])
        image_cond_in = torch.cat([image_cond[i:i + 1].expand(n, *image_cond.shape[1:]) for i, n in enumerate(counts)] + [image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if opts.skip_early_cond and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
        n_cond = tensor.shape[0]
        def run(rows, c):
            text = c if isinstance(uncond, dict) else {"c_crossattn": [c]}  # SDXL: the dict's keys go as they are
            return self.inner_model(x_in[rows], sigma_in[rows], cond={**text, "c_concat": [image_cond_in[rows]]})
        if skip_uncond:
            x_out = run(slice(0, n_cond), tensor)
            x_out = torch.cat([x_out, x_out[[c[0][0] for c in conds_list]]])
        elif tensor.shape[1] == uncond.shape[1]:
            x_out = run(slice(None), catenate_conds([tensor, uncond]))
        else:  # prompt and negative prompt of different lengths: two model calls
            x_out = torch.cat([run(slice(0, n_cond), tensor), run(slice(n_cond, None), uncond)])
        cfg_denoised_callback(CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model))

        denoised_uncond = x_out[-batch:]
        scale = 1.0 if skip_uncond else cond_scale
        denoised = denoised_uncond.clone()
        for i, conds in enumerate(conds_list):
            for row, weight in conds:
                denoised[i] += (x_out[row] - denoised_uncond[i]) * (weight * scale)
        self.step += 1
        return denoised

    def forward_forge(self, x, sigma, uncond, conds_list, tensor, cond_scale, s_min_uncond, image_cond):
        """Forge's forward: one x row per image in the callback params, no on_cfg_denoised, CFG in the backend."""
        from backend.sampling.sampling_function import sampling_function
        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        if opts.skip_early_cond and self.step / self.total_steps <= opts.skip_early_cond:
            cond_scale = 1.0
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
            self.p.extra_generation_params["NGMS"] = s_min_uncond
        denoised, _, _ = sampling_function(self, denoiser_params=params, cond_scale=cond_scale, cond_composition=conds_list)
        self.step += 1
        return denoised
