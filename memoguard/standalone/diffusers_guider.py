"""MemoGuard as a diffusers guider, for modular pipelines (`diffusers.guiders`, `pipe.update_components(guider=...)`).

    from memoguard.standalone.diffusers_guider import MemoGuardGuidance
    guider = MemoGuardGuidance(guidance_scale=5.0).watching(pipe)        # pipe: a modular pipeline
    pipe.update_components(guider=guider)
    latents = pipe(prompt="...", output="latents")
    print([v.summary() for v in guider.recorder.verdicts()])

Classifier-free guidance exactly as diffusers' ClassifierFreeGuidance computes it (start, stop, rescale included),
plus, from the two predictions the guider is handed at each step, MemoGuard's score of every image (no extra model
call: with mitigation off the latents are bit-identical to plain CFG). With `mitigation` "always" or "auto"
("auto": the images whose first-step score reaches the threshold, from the calibration made for the UNet's
weights or `threshold`), those images are guided at `early_scale` for the first `delay` share of the steps, planned
by memoguard.mitigate from the first step's scores: away from the prompt (opposite guidance, the default: -3 for
0.2 of the steps, the best measured schedule), or with early_scale 0 not at all (delayed guidance, 0.3 of them).
Nothing MemoGuard reads or plans is raised into the pipeline: a failure makes the score unavailable, with the
reason, and the step is plain CFG.
"""
from typing import Optional

from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance

from ..hosts import early_guidance
from ..mitigate import (DEFAULT_EARLY_SCALE, MitigationRecord, check_early_scale, check_mode, plan_guidance_delay,
                        schedule_delay, schedule_of)
from ..score import step_score
from .diffusers_hook import PipelineError, ScoreRecorder


class MemoGuardGuidance(ClassifierFreeGuidance):
    """ClassifierFreeGuidance that scores each step and can steer flagged images in the first steps: opposite guidance
    (early_scale < 0, the default: the best measured schedule) or delayed guidance (early_scale 0)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 mitigation: str = "off", delay: Optional[float] = None, threshold: Optional[float] = None,
                 fpr: float = 0.01, early_scale: float = DEFAULT_EARLY_SCALE):
        super().__init__(guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled)
        check_mode(mitigation, 0.0)
        check_early_scale(early_scale)
        self.mitigation, self.threshold, self.fpr, self.early_scale = mitigation, threshold, fpr, early_scale
        self.strategy = schedule_of(early_scale)
        self.delay = schedule_delay(self.strategy, delay)
        self.recorder: Optional[ScoreRecorder] = None
        self.record: Optional[MitigationRecord] = None  # what the mitigation did in the last call
        self._plan = None

    def watching(self, pipe, calibration="auto", window: int = 1) -> "MemoGuardGuidance":
        """Read the scores of `pipe`'s UNet and scheduler (calibration: "auto", a Calibration, or None)."""
        self.recorder = ScoreRecorder(pipe.unet, pipe.scheduler, calibration, window, self.fpr, self.threshold)
        return self

    def forward(self, pred_cond, pred_uncond=None):
        out = super().forward(pred_cond, pred_uncond)
        if self.recorder is None:
            raise PipelineError("call guider.watching(pipe) before the pipeline runs")
        if pred_uncond is None:  # CFG off at this step (start / stop): nothing to score
            return out
        try:
            if self._step == 0:
                self.recorder.start()
                self._plan, self.record = None, None
            diff = self.recorder.record(self._step, self._timestep, pred_cond, pred_uncond)
        except Exception as e:  # no score; the step stays plain CFG
            self._plan = None
            self.recorder.failed(e)
            return out
        if self._step == 0 and self.mitigation != "off":
            threshold = self._threshold()
            if self.mitigation == "auto" and threshold is None:
                self.record = MitigationRecord(mode="auto", ran=False, strategy=self.strategy,
                                               reason=f"no threshold: {self.recorder.calibration_note or 'no calibration'}")
            else:
                self._plan, self.record = plan_guidance_delay(step_score(diff, self.recorder.trace.detector),
                                                              self._num_inference_steps,
                                                              mode=self.mitigation, threshold=threshold,
                                                              delay=self.delay, early_scale=self.early_scale)
        if self._plan is not None and self._plan.applies(self._step):
            out.pred = early_guidance(out.pred, pred_cond, pred_uncond, self._plan.images, self._plan.scale)
        return out

    def _threshold(self) -> Optional[float]:
        if self.threshold is not None or self.recorder.calibration is None:
            return self.threshold
        return self.recorder.calibration.threshold(self.fpr)

