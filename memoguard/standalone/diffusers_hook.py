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
from ..calibration_lookup import CalibrationLookup
from ..errors import MemoGuardError
from ..identity import weights_fingerprint
from ..mitigate import mitigate
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


class PipelineMonitor:
    """Records the per-step gaps of the pipeline calls made while it is attached (`with watch(pipe) as m`)."""

    def __init__(self, pipe, calibration: Union[Calibration, str, None] = "auto", window: int = 1, fpr: float = 0.01,
                 threshold: Optional[float] = None):
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise PipelineError(f"prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
        if type(pipe).__name__ not in LAYOUTS:
            raise PipelineError(f"{type(pipe).__name__} is not a pipeline whose guided batch MemoGuard knows "
                                f"({', '.join(LAYOUTS)})")
        self.pipe, self.parameterization = pipe, PREDICTIONS[prediction]
        self.calibration_note = ""
        if calibration == "auto":
            found = CalibrationLookup("auto", "", [default_store_folder()],
                                      "run `memoguard calibrate --model ...` on this model").resolve(
                weights_fingerprint(pipe.unet))
            calibration, self.calibration_note = found.calibration, found.problem
        self.calibration, self.window, self.fpr, self.threshold = calibration, window, fpr, threshold
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float()
        self.trace = ScoreTrace()
        self._handle = None
        self._step = 0
        self._images = 0  # images of the last call, from the UNet's batch

    def __enter__(self) -> "PipelineMonitor":
        self.trace, self._step, self._images = ScoreTrace(), 0, 0
        self._handle = self.pipe.unet.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None

    def _record(self, module, args, kwargs, output) -> None:
        """The UNet's forward hook: whatever goes wrong here is recorded, never raised into the pipeline."""
        try:
            self._read(args, kwargs, output)
        except Exception as e:
            log.warning("MemoGuard could not read this UNet call: %s", e, exc_info=e)
            self.trace.mark_unavailable(f"MemoGuard could not read the pipeline's UNet call ({type(e).__name__}: {e})")

    def _read(self, args, kwargs, output) -> None:
        pred = output[0] if isinstance(output, tuple) else output.sample
        guided = getattr(self.pipe, "do_classifier_free_guidance", True)
        self._images = pred.shape[0] // 2 if guided else pred.shape[0]
        if not guided:
            self.trace.mark_unavailable(NO_CFG)
            return
        if pred.shape[0] % 2:
            raise PipelineError(f"a guided batch of {pred.shape[0]} rows is not [negative; prompt] pairs")
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).reshape(-1)[:1].round().long()
        alpha, sigma = coefficients_vp(self.alphas_cumprod.to(pred.device), t)
        uncond, cond = pred.detach().chunk(2)  # diffusers batches [negative, prompt]
        self.trace.record(self._step, eps_difference(cond, uncond, self.parameterization, alpha, sigma), float(t))
        self._step += 1

    def verdicts(self) -> List[Verdict]:
        """One verdict per image of the last pipeline call (prompts x num_images_per_prompt)."""
        if not self._images:
            raise PipelineError("no pipeline call was watched yet")
        return verdict_for(self.trace, self.calibration, self.window, self.fpr, self.threshold, images=self._images,
                           uncalibrated_hint=self.calibration_note or "no calibration given")


def watch(pipe, calibration: Union[Calibration, str, None] = "auto", window: int = 1, fpr: float = 0.01,
          threshold: Optional[float] = None) -> PipelineMonitor:
    """A PipelineMonitor for `pipe`; use it as a context manager around the pipeline call. calibration: "auto"
    (the one made for the pipeline's UNet weights, as the CLI finds it), a Calibration, or None (raw scores)."""
    return PipelineMonitor(pipe, calibration, window, fpr, threshold)


def mitigated_prompt(pipe, prompt: str, latents: torch.Tensor, num_inference_steps: int, guidance_scale: float,
                     strategy: str = "auto", **settings):
    """(pipeline keyword arguments, MitigationRecord): `prompt` mitigated for each of the initial `latents`
    (one image per row) with memoguard.mitigate.mitigate — "remove_tokens" (the default here: the pipeline's
    text encoders re-encode) or "minimize"; `settings` are mitigate's (mode, threshold, target, lr, ...).
    Pass the arguments to the pipeline with the same latents, steps and guidance scale."""
    from .diffusers_model import DiffusersModel
    if strategy == "guidance_delay":
        raise PipelineError("delayed guidance changes the guidance scale per step, which a pipeline call cannot "
                            "take: use remove_tokens or minimize")
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
