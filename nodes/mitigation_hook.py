"""Mitigation inside ComfyUI's sampler, with the strategies of memoguard.mitigate.

- "minimize": a CALC_COND_BATCH wrapper sees the conditionings, x and sigma of every model call.
  At the first step of a run it optimises the positive prompt embedding (uncond = the sampler's
  negative) on the sampler's own x_T, puts the result into the run's positive conditioning and
  so every later step samples with it.
- "guidance_delay": a post-CFG function reads the first step's cond/uncond predictions (the
  score, no extra call), decides which images to steer, and for the first steps hands back the
  unconditional prediction of those images as the guided one.
Any failure leaves the sampling as it was.
"""
import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from memoguard import minimize_embedding, rms_per_image, uncond_is_missing
from memoguard.host_autograd import differentiable, ordinary
from memoguard.hosts import (HOST_STRATEGIES, HostSettings, chunked_encoding, empty_encoding, failure_message,
                             release_memory, without_guidance)
from memoguard.mitigate import plan_guidance_delay

from . import live
from memoguard.calibration_lookup import CalibrationLookup

from .calibration_choice import model_key, noise_level, prediction_of
from .comfy_model import CROSSATTN, ComfyDiffusionModel, UnsupportedModel, check_supported, interrupted, split_model_conds
from .monitor_hook import guided_difference, json_safe, register, session_of as _session_of, step_index

log = logging.getLogger("memoguard")

CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
WRAPPER_KEY = "memoguard_mitigation"  # also the model_options entry naming the session
STRATEGIES = HOST_STRATEGIES  # token removal re-encodes the prompt: a MODEL patch has no CLIP


@dataclass
class MitigationSettings(HostSettings):
    """The core's settings; "auto" takes the explicit threshold, else the calibration's (resolved per run)."""
    mitigation: str = "always"
    calibration: Optional[CalibrationLookup] = None

    def __post_init__(self):
        super().__post_init__()
        if self.mitigation == "auto" and self.threshold is None and (self.calibration is None or
                                                                     self.calibration.choice == "none"):
            raise ValueError("mitigation mode 'auto' needs a threshold: pick a calibration or set one")


class MitigationSession:
    def __init__(self, settings: MitigationSettings, node_id=None,
                 emit: Callable[[str, dict], None] = live.send, show: Callable[[str, object], None] = live.show_text):
        self.settings, self.node_id, self.emit, self.show = settings, node_id, emit, show
        self.id = uuid.uuid4().hex
        self.record = None
        self.error: Optional[str] = None
        self.notes: list = []
        self._schedule = None
        self._delay = None          # guidance_delay: the GuidanceDelay of the current run

    def delay_guidance(self, args: dict) -> torch.Tensor:
        """Post-CFG: the guided prediction, the uncond one for delayed images at the delayed steps."""
        denoised = args["denoised"]
        schedule = args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
        if schedule is None:
            return denoised
        step = step_index(schedule, float(args["sigma"].reshape(-1)[0]), 0)
        if schedule is not self._schedule:
            if step != 0:
                return denoised
            self._schedule, self._delay, self.record, self.error, self.notes = schedule, None, None, None, []
            self._plan_delay(args, schedule)
        plan = self._delay
        if plan is None or not plan.applies(step) or plan.images.shape[0] != denoised.shape[0]:
            return denoised
        return without_guidance(denoised, args["uncond_denoised"], plan.images)

    def _plan_delay(self, args, schedule) -> None:
        if self.settings.mitigation == "off":
            return
        if args.get("uncond") is None or uncond_is_missing(args["uncond_denoised"]):
            self._report_skip("at cfg 1 there is no text guidance to delay")
            return
        base_model = args["model"]
        threshold, self.notes = self._threshold(base_model, float(schedule.reshape(-1)[0]), args["input"])
        if self.settings.mitigation == "auto" and threshold is None:
            return
        gap = rms_per_image(guided_difference(args))
        s = self.settings
        self._delay, self.record = plan_guidance_delay(gap, schedule.numel() - 1, mode=s.mitigation,
                                                       threshold=threshold,
                                                       target=s.target, delay=s.delay)
        self.emit("mitigation", json_safe({"node": self.node_id, **self.record.to_dict(), "notes": list(self.notes)}))
        self._publish(self.summary())

    def maybe_minimize(self, base_model, conds, x_in, timestep, model_options) -> None:
        schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
        if schedule is None or schedule is self._schedule:
            return  # already done (or not a sampling run)
        if step_index(schedule, float(timestep.reshape(-1)[0]), 0) != 0:
            return
        self._schedule, self.record, self.error, self.notes = schedule, None, None, []
        if self.settings.mitigation == "off":
            return
        positive, negative = conds[0], conds[1] if len(conds) > 1 else None
        if negative is None or len(positive) != 1 or len(negative) != 1 or any(
                k in c for c in positive + negative for k in ("area", "mask")):
            self._report_skip("mitigation needs exactly one positive and one negative conditioning without "
                              "areas or masks, and cfg != 1")
            return
        try:
            check_supported(base_model)
        except UnsupportedModel as e:
            self._report_skip(str(e))
            return
        threshold, self.notes = self._threshold(base_model, float(schedule.reshape(-1)[0]), x_in)
        if self.settings.mitigation == "auto" and threshold is None:
            return
        self._minimize(base_model, positive, negative[0], x_in, timestep, threshold)

    def _threshold(self, base_model, first_sigma: float, x_in):
        """(threshold, notes) of this run: the explicit one, else the calibration of these weights."""
        s = self.settings
        if s.threshold is not None or s.mitigation != "auto":
            return s.threshold, []
        found = s.calibration.resolve(model_key(base_model))
        if found.calibration is None:
            self._report_skip(f"mode 'auto' has no threshold for this model: {found.problem}; or set threshold > 0")
            return None, []
        level = noise_level(base_model, first_sigma)
        cal = found.calibration.at_noise_level(level)
        return s.threshold_from(cal), cal.check(prediction_of(base_model), level, list(x_in.shape[1:]), window=1)

    def fail(self, error: BaseException) -> None:
        """Anything that went wrong (out of memory, an interrupt, a bug): the run samples the plain prompt."""
        self._delay = None  # a run that failed is not steered further
        self.error = failure_message("mitigating", error)
        log.error("%s", self.error, exc_info=error)
        release_memory(error)
        self._publish(f"mitigation failed, prompt unchanged ({self.error})")

    def _minimize(self, base_model, positive, negative, x_in, timestep, threshold) -> None:
        entry = positive[0]
        batch = x_in.shape[0]
        with differentiable(base_model):
            cond, extra_c = split_model_conds(entry["model_conds"])
            uncond, extra_u = split_model_conds(negative["model_conds"])
            cond_enc = chunked_encoding(cond.expand(batch, -1, -1) if cond.shape[0] == 1 else cond, extra=extra_c)
            uncond_enc = empty_encoding(uncond[:1], {k: v[:1] for k, v in extra_u.items()})
            model = ComfyDiffusionModel(base_model)
            new, record = minimize_embedding(model, cond_enc, uncond_enc, ordinary(x_in), ordinary(timestep),
                                             mode=self.settings.mitigation, threshold=threshold,
                                             target=self.settings.target, lr=self.settings.lr,
                                             max_iters=self.settings.max_iters, should_stop=interrupted)
        self.record = record
        if record.ran:
            crossattn = entry["model_conds"][CROSSATTN]
            positive[0] = {**entry, "model_conds": {**entry["model_conds"], CROSSATTN: crossattn._copy_with(new)}}
        self.emit("mitigation", json_safe({"node": self.node_id, **record.to_dict(), "notes": list(self.notes)}))
        self._publish(self.summary())

    def summary(self) -> str:
        r = self.record
        if r is None:
            return self.error or "mitigation has not run yet"
        scores = lambda xs: ", ".join(f"{x:.4f}" for x in xs)
        notes = "".join(f"; note: {n}" for n in self.notes)
        if not r.ran:
            return f"{r.strategy_name}: not run ({r.reason}); first-step score {scores(r.before)}{notes}"
        if r.strategy == "guidance_delay":
            steered = sum(1 for n in r.image_iterations if n)
            return (f"{r.strategy_name}: no text guidance for the first {r.delay_steps} step(s) of "
                    f"{steered} of {len(r.before)} image(s); first-step score {scores(r.before)}{notes}")
        return (f"{r.strategy_name}: {r.iterations} iteration(s), "
                f"first-step score {scores(r.before)} -> {scores(r.after)}{notes}")

    def _report_skip(self, reason: str) -> None:
        self.error = reason
        self._publish(f"no mitigation: {reason}")

    def _publish(self, text: str) -> None:
        self.show(f"MemoGuard: {text}", self.node_id)




def attach_mitigation(model, session: MitigationSession):
    """Clone-then-patch: a new MODEL that mitigates with the session's strategy."""
    patched = model.clone()
    if session.settings.strategy == "guidance_delay":
        def memoguard_guidance_delay(args):
            try:
                return session.delay_guidance(args)
            except Exception as e:
                session.fail(e)
                return args["denoised"]
        patched.set_model_sampler_post_cfg_function(memoguard_guidance_delay)
        register(patched, WRAPPER_KEY, session)
        return patched

    def memoguard_mitigation(executor, base_model, conds, x_in, timestep, model_options):
        try:
            session.maybe_minimize(base_model, conds, x_in, timestep, model_options)
        except Exception as e:
            session.fail(e)
        return executor(base_model, conds, x_in, timestep, model_options)

    patched.add_wrapper_with_key(CALC_COND_BATCH, WRAPPER_KEY, memoguard_mitigation)
    register(patched, WRAPPER_KEY, session)
    return patched


def session_of(model):
    return _session_of(model, WRAPPER_KEY)
