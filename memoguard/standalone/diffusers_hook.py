"""Watch a diffusers Stable Diffusion pipeline: the score of every image at every step, read from the
pipeline's own classifier-free-guidance forward (no extra UNet call; the images stay bit-identical);
and mitigate a prompt for it, as prompt embeddings for the same initial latents.

    from memoguard.standalone.diffusers_hook import watch
    with watch(pipe) as monitor:
        images = pipe(prompt, num_images_per_prompt=4).images
    print([v.summary() for v in monitor.verdicts()])

SD1.x / SD2.x / SDXL pipelines batch the negative prompt first, then the prompt, through one UNet call
per step (`pipe.do_classifier_free_guidance`); the hook splits that output, turns it into eps_c - eps_u with
the scheduler's prediction type and VP schedule, and records it in a memoguard.score.ScoreTrace. It reads
only pipelines whose layout it knows (LAYOUTS) and never raises into the pipeline's call: anything it cannot
read makes the score unavailable, with the reason, and the images are untouched. By default the calibration
is the one made for the pipeline's UNet weights (looked up as the CLI does: the calibration folder, then the
preset of the bundled model).

    kwargs, record = mitigated_prompt(pipe, prompt, latents, num_inference_steps=30, guidance_scale=7.5)
    images = pipe(latents=latents, num_inference_steps=30, guidance_scale=7.5, **kwargs).images
"""
import logging
from typing import List, Optional, Union

import torch

from ..calibration import Calibration, default_store_folder
from ..calibration_lookup import CalibrationLookup, run_detector
from ..errors import MemoGuardError
from ..identity import weights_fingerprint
from ..mitigate import SCHEDULES, mitigate
from ..score import ScoreTrace, coefficients_vp, eps_difference
from ..verdict import Verdict, verdict_for

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
NO_CFG = "the pipeline ran without classifier-free guidance (guidance_scale <= 1): there is no gap to measure"
# pipelines whose guided UNet call batches [negative prompts; prompts] (diffusers' classic SD / SDXL pipelines)
LAYOUTS = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
           "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
log = logging.getLogger("memoguard")


class PipelineError(MemoGuardError, ValueError):
    """A pipeline MemoGuard cannot read the score from."""


class ScoreRecorder:
    """What watching a pipeline's guidance needs, wherever the two predictions are read: the scheduler's
    prediction type and VP schedule, the calibration made for the UNet's weights, and the trace of one call."""

    def __init__(self, unet, scheduler, calibration: Union[Calibration, str, None] = "auto", window: int = 1,
                 fpr: float = 0.01, threshold: Optional[float] = None):
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise PipelineError(f"prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
        self.parameterization = PREDICTIONS[prediction]
        self.calibration_note = ""
        if calibration == "auto":
            found = CalibrationLookup("auto", "", [default_store_folder()],
                                      "run `memoguard calibrate --model ...` on this model").resolve(
                weights_fingerprint(unet))
            calibration, self.calibration_note = found.calibration, found.problem
        self.calibration, self.window, self.fpr, self.threshold = calibration, window, fpr, threshold
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.start()

    def start(self) -> None:
        """A new pipeline call."""
        self.trace, self.images = ScoreTrace(detector=run_detector(self.calibration)), 0

    def record(self, step: int, t, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
        """eps_c - eps_u of every image at this step, recorded; returned for a caller that steers with it."""
        self.images = pred_cond.shape[0]
        t = torch.as_tensor(t).reshape(-1)[:1].round().long()
        alpha, sigma = coefficients_vp(self.alphas_cumprod.to(pred_cond.device), t)
        diff = eps_difference(pred_cond.detach(), pred_uncond.detach(), self.parameterization, alpha, sigma)
        self.trace.record(step, diff, float(t))
        return diff

    def failed(self, error: Exception) -> None:
        """Whatever goes wrong while reading is recorded, never raised into the pipeline."""
        log.warning("MemoGuard could not read this guidance step: %s", error, exc_info=error)
        self.trace.mark_unavailable(f"MemoGuard could not read the pipeline's guidance ({type(error).__name__}: "
                                    f"{error})")

    def verdicts(self) -> List[Verdict]:
        """One verdict per image of the last pipeline call (prompts x num_images_per_prompt)."""
        if not self.images:
            raise PipelineError("no pipeline call was watched yet")
        return verdict_for(self.trace, self.calibration, self.window, self.fpr, self.threshold, images=self.images,
                           uncalibrated_hint=self.calibration_note or "no calibration given")


class PipelineMonitor(ScoreRecorder):
    """Records the per-step gaps of the pipeline calls made while it is attached (`with watch(pipe) as m`)."""

    def __init__(self, pipe, calibration: Union[Calibration, str, None] = "auto", window: int = 1, fpr: float = 0.01,
                 threshold: Optional[float] = None):
        if type(pipe).__name__ not in LAYOUTS:
            raise PipelineError(f"{type(pipe).__name__} is not a pipeline whose guided batch MemoGuard knows "
                                f"({', '.join(LAYOUTS)})")
        super().__init__(pipe.unet, pipe.scheduler, calibration, window, fpr, threshold)
        self.pipe = pipe
        self._handle = None
        self._step = 0

    def __enter__(self) -> "PipelineMonitor":
        self.start()
        self._step = 0
        self._handle = self.pipe.unet.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None

    def _record(self, module, args, kwargs, output) -> None:
        """The UNet's forward hook."""
        try:
            self._read(args, kwargs, output)
        except Exception as e:
            self.failed(e)

    def _read(self, args, kwargs, output) -> None:
        pred = output[0] if isinstance(output, tuple) else output.sample
        if not getattr(self.pipe, "do_classifier_free_guidance", True):
            self.images = pred.shape[0]
            self.trace.mark_unavailable(NO_CFG)
            return
        if pred.shape[0] % 2:
            raise PipelineError(f"a guided batch of {pred.shape[0]} rows is not [negative; prompt] pairs")
        uncond, cond = pred.chunk(2)  # diffusers batches [negative, prompt]
        self.record(self._step, args[1] if len(args) > 1 else kwargs["timestep"], cond, uncond)
        self._step += 1


def watch(pipe, calibration: Union[Calibration, str, None] = "auto", window: int = 1, fpr: float = 0.01,
          threshold: Optional[float] = None) -> PipelineMonitor:
    """A PipelineMonitor for `pipe`; use it as a context manager around the pipeline call. calibration: "auto"
    (the one made for the pipeline's UNet weights, as the CLI finds it), a Calibration, or None (raw scores)."""
    return PipelineMonitor(pipe, calibration, window, fpr, threshold)


def mitigated_prompt(pipe, prompt: str, latents: torch.Tensor, num_inference_steps: int, guidance_scale: float,
                     strategy: str = "auto", **settings):
    """(pipeline keyword arguments, MitigationRecord): `prompt` mitigated for each of the initial `latents`
    (one image per row) with memoguard.mitigate.mitigate — "mask_padding" (the default), "remove_tokens" (the
    pipeline's text encoders re-encode) or "minimize"; `settings` are mitigate's (mode, threshold, target, lr, ...).
    Pass the arguments to the pipeline with the same latents, steps and guidance scale."""
    from .diffusers_model import DiffusersModel
    if any(part in SCHEDULES for part in strategy.split("+")):
        raise PipelineError(f"{strategy} changes the guidance scale per step, which a pipeline call cannot take: "
                            f"use mask_padding, remove_tokens or minimize (or MemoGuardGuidance for the schedules)")
    model = DiffusersModel.from_pipeline(pipe)
    images = latents.shape[0]
    with torch.no_grad():
        cond, uncond = model.encode([prompt]).repeat_rows(images), model.encode([""])
    x = model.initial_x(latents.to(model.device))
    plan = mitigate(model, cond, uncond, x, model.timesteps(num_inference_steps), guidance_scale, strategy=strategy,
                    **settings)
    kwargs = {"prompt_embeds": plan.cond.embedding.detach(),
              "negative_prompt_embeds": uncond.embedding.expand(images, -1, -1)}
    if model.is_sdxl:
        kwargs["pooled_prompt_embeds"] = plan.cond.extra["text_embeds"].detach()
        kwargs["negative_pooled_prompt_embeds"] = uncond.extra["text_embeds"].expand(images, -1)
    return kwargs, plan.record
