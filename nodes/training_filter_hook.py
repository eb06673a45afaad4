"""The training filter inside ComfyUI's own training node (Train LoRA, comfy_extras/nodes_train.py).

That node takes a batch-mean loss of the model's prediction with no per-sample weights, so the filter sits where
the model is called: a model_function_wrapper that, while gradients are on (training; ComfyUI samples under
inference mode, where it steps aside), also runs the empty prompt on the same noisy latents without gradients,
hands each sample's gap to the core's MemorizationFilter (relative to the ordinary gap of its timestep band, keyed
by its caption's encoding for barring) and returns the prediction with the dropped samples' gradient removed
(memoguard.train_filter.kept_gradient). A failure inside MemoGuard leaves the prediction as it was (training goes
on unfiltered) and is reported by MemoGuard Training Filter Report.
"""
from typing import Dict, List, Optional

import torch

from memoguard.hosts import coefficients_kdiffusion
from memoguard.model import expand_batch, match_length
from memoguard.train_filter import MemorizationFilter, gaps_from_predictions, kept_gradient, sample_key

from .comfy_model import CROSSATTN, ComfyDiffusionModel, model_inputs

FIT_BATCH = 16  # samples per model call while measuring the ordinary gaps
WRAPPER_OPTION = "model_function_wrapper"  # where the filter sits in the model's options


class TrainingFilterHook:
    """model_function_wrapper of the filtered model. ComfyUI deep-copies model options on every clone; a copy of the
    hook is the hook itself, so the clones (Train LoRA's included) share one filter and its record."""

    def __init__(self, filt: MemorizationFilter, empty_embedding: torch.Tensor, empty_extra: dict,
                 images_of_key: Dict[str, List[int]], timestep_of, previous=None):
        self.filter = filt
        self.empty_embedding, self.empty_extra = empty_embedding, empty_extra
        self.images_of_key = images_of_key  # caption fingerprint -> the dataset images with that caption
        self.timestep_of = timestep_of      # sigma -> the model's timestep (model_sampling.timestep)
        self.previous = previous            # a wrapper set before this one, still called
        self.error: Optional[str] = None
        self.unknown_keys = 0

    def __deepcopy__(self, memo):
        return self

    def _call(self, apply_model, args, x, sigma, c):
        if self.previous is None:
            return apply_model(x, sigma, **c)
        return self.previous(apply_model, {**args, "input": x, "timestep": sigma, "c": c})

    def __call__(self, apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]
        out = self._call(apply_model, args, x, sigma, c)
        if not (torch.is_grad_enabled() and out.requires_grad) or self.error is not None:
            return out  # sampling, or a filter that already failed: the model as it is
        try:
            return kept_gradient(out, self._keep(apply_model, args, x, sigma, c, out))
        except Exception as e:  # the user's training goes on unfiltered; the report says why
            self.error = f"{type(e).__name__}: {e}"
            return out

    def _keep(self, apply_model, args, x, sigma, c, out) -> torch.Tensor:
        cond = c[CROSSATTN]
        batch = cond.shape[0]
        uncond = {**c, CROSSATTN: expand_batch(match_length(self.empty_embedding, cond.shape[1]).to(cond), batch)}
        uncond.update({k: expand_batch(v.to(cond.device), batch)
                       for k, v in model_inputs(self.empty_extra).items() if isinstance(v, torch.Tensor)})
        with torch.no_grad():
            out_u = self._call(apply_model, args, x, sigma, uncond)
        sigmas = sigma.detach().float().reshape(-1).cpu()
        alpha, s = coefficients_kdiffusion(sigmas)
        gaps = gaps_from_predictions(out.cpu(), out_u.cpu(), "x0", alpha, s)
        keys = [sample_key(row) for row in cond]
        self.unknown_keys += sum(k not in self.images_of_key for k in keys)
        keep = self.filter.keep_mask(gaps, self.timestep_of(sigmas), keys)
        return keep.to(out.device)

    def report(self) -> dict:
        """What the filter did so far, in dataset images."""
        f, stats = self.filter, self.filter.stats
        barred = [{"images": self.images_of_key.get(key, []), "step": step} for key, step in f.barred.items()]
        return {"steps": stats.steps, "samples": stats.samples, "dropped": stats.dropped,
                "drop_rate": stats.drop_rate, "tau": f.tau, "drop_share": f.nominal_drop_rate,
                "barred": sorted(barred, key=lambda b: b["step"]), "error": self.error,
                "unmatched_samples": self.unknown_keys}


def conditioning_entries(positive: list, images: int) -> list:
    """(cond, options) per dataset image, as Train LoRA pairs them: one entry for every image, or one per image
    (a text-set loader's list of conditionings is flattened)."""
    entries = []
    for item in positive:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            entries.append((item[0], item[1]))
        else:
            entries.extend(conditioning_entries(item, 0))
    if images and len(entries) == 1:
        entries = entries * images
    if images and len(entries) != images:
        raise ValueError(f"{len(entries)} captions for {images} images: Train LoRA needs one caption per image "
                         "(or one for all)")
    return entries


def fit_filter(patcher, clip, buckets: List[torch.Tensor], positive: list, *, drop_share: float, bar_alpha: float,
               count_after: int, reference_samples: int, seed: int) -> TrainingFilterHook:
    """The filter for a dataset (Train LoRA's latents, one tensor or several of different sizes, and captions),
    measured on the model before training: the gaps of `reference_samples` samples noised as Train LoRA noises
    them (a random image, a sigma from a uniform share of the schedule, fresh noise) give the ordinary gap per
    timestep band and tau at `drop_share` of them dropped (MemorizationFilter.relative_to_ordinary)."""
    base = patcher.model
    device = getattr(patcher, "load_device", None) or buckets[0].device
    latents = [base.process_latent_in(b.float()).to(device) for b in buckets]
    images = [(k, row) for k, b in enumerate(latents) for row in range(b.shape[0])]
    entries = conditioning_entries(positive, len(images))
    model = ComfyDiffusionModel(base, clip=clip, noise=latents[0][:1], device=device, words=False)
    empty = model.encode([""], prompt_type="negative")
    encoded, key_of, images_of_key = {}, [], {}
    for index, (cond, options) in enumerate(entries):
        embedding, extra = model.conditioning_inputs(cond, options)
        key = sample_key(embedding[0])
        encoded.setdefault(key, (embedding, extra))
        images_of_key.setdefault(key, []).append(index)
        key_of.append(key)
    sampling = base.model_sampling
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(images), (reference_samples,), generator=g).tolist()
    # Train LoRA draws a uniform share of the schedule; drawn stratified here, every timestep band is measured
    percents = (torch.arange(reference_samples) + torch.rand(reference_samples, generator=g)) / reference_samples
    sigmas = torch.tensor([float(sampling.percent_to_sigma(float(p))) for p in percents])
    gaps = torch.empty(reference_samples)
    # one model call per caption length and image size, at most FIT_BATCH samples
    shape_of = lambda r: (encoded[key_of[pick[r]]][0].shape[1], images[pick[r]][0])
    groups = {}
    for r in range(reference_samples):
        groups.setdefault(shape_of(r), []).append(r)
    with torch.no_grad():
        for (length, bucket), members in groups.items():
            for start in range(0, len(members), FIT_BATCH):
                part = members[start:start + FIT_BATCH]
                pairs = [encoded[key_of[pick[r]]] for r in part]
                embedding = torch.cat([e for e, _ in pairs]).to(device)
                extra = {k: torch.cat([x[k] for _, x in pairs]).to(device) for k in pairs[0][1]}
                clean = latents[bucket][[images[pick[r]][1] for r in part]]
                noise = torch.randn(clean.shape, generator=g).to(device)
                sigma = sigmas[part].to(device)
                x = sampling.noise_scaling(sigma, noise, clean, False)
                gaps[part] = gaps_from_predictions(model.eps(x, sigma, embedding, extra),
                                                   model.eps_uncond(x, sigma, empty, length)).cpu()
    filt = MemorizationFilter.relative_to_ordinary(gaps, sampling.timestep(sigmas).float(), drop_share,
                                                   bar_alpha=bar_alpha or None, warmup_steps=count_after)
    timestep_of = lambda s: sampling.timestep(s.to(sampling.sigmas.device)).float().cpu()
    return TrainingFilterHook(filt, empty.embedding.detach().cpu(), {k: v.detach().cpu() for k, v in empty.extra.items()},
                              images_of_key, timestep_of, patcher.model_options.get(WRAPPER_OPTION))


def report_text(report: Optional[dict]) -> str:
    if report is None:
        return "this model has no MemoGuard Training Filter: put one between the model and Train LoRA"
    if report["error"]:
        return f"the filter failed and training went on unfiltered: {report['error']}"
    if not report["steps"]:
        return "the filter has not seen a training step yet (connect an output of Train LoRA to 'trained')"
    lines = [f"{report['steps']} training steps: {report['dropped']} of {report['samples']} samples dropped "
             f"({100 * report['drop_rate']:.1f} %; ordinary samples are dropped at {100 * report['drop_share']:.0f} % "
             f"by design)"]
    if report["barred"]:
        lines.append(f"{len(report['barred'])} caption(s) barred (their samples dropped far more often than an "
                     "ordinary caption's could be; all their later samples dropped):")
        lines += [f"  images {', '.join(map(str, b['images'][:12]))}{' ...' if len(b['images']) > 12 else ''} "
                  f"({len(b['images'])} with this caption), barred at step {b['step']}" for b in report["barred"]]
    else:
        lines.append("no caption barred")
    if report["unmatched_samples"]:
        lines.append(f"{report['unmatched_samples']} samples had a caption the filter was not given")
    return "\n".join(lines)
