"""Mitigation inside ComfyUI's sampler, with the strategies of memoguard.mitigate.

- The starts ("mask_padding", "remove_tokens", "minimize"): a CALC_COND_BATCH wrapper sees the
  conditionings, x and sigma of every model call. At the first step of a run it changes the positive
  prompt embedding on the sampler's own x_T (uncond = the sampler's negative) and puts the result into
  the run's positive conditioning, so every later step samples with it. Padding masking needs the
  prompt's tokens and token removal its text and CLIP: both come with a positive prompt encoded by
  MemoGuard Text Encode (comfy_model.PromptSource).
- The schedules ("guidance_delay", "opposite_guidance"): a post-CFG function reads the first step's
  cond/uncond predictions (the score, no extra call), decides which images to steer, and for the first
  steps hands back their prediction guided at the early scale (0: the unconditional one).
- "auto": the best measured strategy the run's conditioning allows (memoguard.mitigate.host_strategy).
Any failure leaves the sampling as it was.
"""
import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from memoguard import minimize_embedding, step_score, uncond_is_missing
from memoguard.host_autograd import differentiable, ordinary
from memoguard.hosts import (HOST_STRATEGIES, HostSettings, chunked_encoding, early_guidance, empty_encoding,
                             failure_message, release_memory)
from memoguard.mitigate import (DEFAULT_WITHOUT_PADDING, PADDING_PREMISE, SCHEDULES, host_strategy, mask_padding,
                               plan_guidance_delay, remove_tokens)

from . import live
from memoguard.calibration_lookup import CalibrationLookup, run_detector

from .calibration_choice import embedded_guidance, model_key, prediction_of
from .comfy_model import (CROSSATTN, ComfyDiffusionModel, UnsupportedModel, interrupted,
                          prompt_source, split_model_conds)
from .monitor_hook import guided_difference, json_safe, register, session_of as _session_of, step_index

log = logging.getLogger("memoguard")

CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
WRAPPER_KEY = "memoguard_mitigation"  # also the model_options entry naming the session
STRATEGIES = ("auto",) + HOST_STRATEGIES
NEEDS_TEXT = ("mask_padding", "remove_tokens")
HOW_TO_TEXT = "encode the positive prompt with MemoGuard Text Encode instead of CLIP Text Encode"


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
        self.strategy: Optional[str] = None  # this run's ("auto" resolved at its first step)
        self._schedule = None
        self._plan = None          # a schedule's GuidanceDelay for the current run
        self._planned = False

    # -- the first model call of a run: which strategy, and the starts ---------------------------------------
    def at_model_call(self, base_model, conds, x_in, timestep, model_options) -> None:
        schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
        if schedule is None or schedule is self._schedule:
            return  # already done (or not a sampling run)
        if step_index(schedule, float(timestep.reshape(-1)[0]), 0) != 0:
            return
        self._schedule, self.record, self.error, self.notes = schedule, None, None, []
        self._plan, self._planned, self.strategy = None, False, None
        if self.settings.mitigation == "off":
            return
        positive, negative = conds[0], conds[1] if len(conds) > 1 else None
        source = prompt_source(positive[0]) if positive and len(positive) == 1 else None
        self.strategy = (host_strategy(source is not None) if self.settings.strategy == "auto"
                         else self.settings.strategy)
        if self.strategy in SCHEDULES:
            return  # planned after CFG, from the predictions it already has
        if negative is None or len(positive) != 1 or len(negative) != 1 or any(
                k in c for c in positive + negative for k in ("area", "mask")):
            self._report_skip("mitigation needs exactly one positive and one negative conditioning without "
                              "areas or masks, and cfg != 1")
            return
        if self.strategy in NEEDS_TEXT and source is None:
            self._report_skip(f"{self.strategy} needs the prompt's text: {HOW_TO_TEXT}")
            return
        threshold, self.notes, detector = self._threshold(base_model, float(schedule.reshape(-1)[0]), x_in,
                                                          embedded_guidance(positive))
        if self.settings.mitigation == "auto" and threshold is None:
            return
        try:
            self._start(base_model, positive, negative[0], source, x_in, timestep, threshold, detector)
        except UnsupportedModel as e:  # a conditioning MemoGuard cannot read or map to words: said, not a failure
            self._report_skip(str(e))

    def _start(self, base_model, positive, negative, source, x_in, timestep, threshold, detector) -> None:
        entry, s, batch = positive[0], self.settings, x_in.shape[0]
        with differentiable(base_model):
            cond, extra_c = split_model_conds(entry["model_conds"])
            uncond, extra_u = split_model_conds(negative["model_conds"])
            cond = cond.expand(batch, -1, -1) if cond.shape[0] == 1 else cond
            uncond_enc = empty_encoding(uncond[:1], {k: v[:1] for k, v in extra_u.items()})
            model = ComfyDiffusionModel(base_model, clip=None if source is None else source.clip, noise=x_in,
                                        device=x_in.device)
            x, t = ordinary(x_in), ordinary(timestep)
            common = dict(mode=s.mitigation, threshold=threshold, target=s.target, detector=detector)
            if self.strategy == "minimize":
                new, record = minimize_embedding(model, chunked_encoding(cond, extra=extra_c), uncond_enc, x, t,
                                                 lr=s.lr, max_iters=s.max_iters, should_stop=interrupted, **common)
                new_extra = {}
            else:
                if self.strategy == "mask_padding":
                    model.clip_positions = model.clip_positions_of(source.text, cond.shape[1])
                    if model.clip_positions is None:
                        if s.strategy != "auto":
                            raise UnsupportedModel(f"{PADDING_PREMISE}: choose {DEFAULT_WITHOUT_PADDING}")
                        self.strategy = DEFAULT_WITHOUT_PADDING  # auto: the strategy whose premise holds for any encoder
                        self.notes.append("auto: token removal (padding masking needs a CLIP chunk in the conditioning)")
                prompt = model.prompt_encoding(source.text, cond, extra_c, check=self.strategy == "remove_tokens")
                if prompt is None:
                    self._report_skip(f"the positive conditioning is not MemoGuard Text Encode's encoding of its "
                                      f"prompt (a node changed it on the way): {self.strategy} left it unchanged")
                    return
                if self.strategy == "mask_padding":
                    enc, record = mask_padding(model, prompt, uncond_enc, x, t, **common)
                else:
                    enc, record = remove_tokens(model, prompt, uncond_enc, x, t, max_removals=3,
                                                should_stop=interrupted, **common)
                new, new_extra = enc.embedding, enc.extra
        self.record = record
        if record.ran:
            changed = torch.tensor([n > 0 for n in record.image_iterations])
            model_conds = dict(entry["model_conds"])
            model_conds[CROSSATTN] = model_conds[CROSSATTN]._copy_with(new)
            for key, value in new_extra.items():  # SDXL's pooled text of a prompt without words
                if key in model_conds and value.shape[0] == batch:
                    old = model_conds[key].cond
                    old = old.expand(batch, *old.shape[1:]) if old.shape[0] == 1 else old
                    keep = (~changed).to(old.device).reshape(-1, *([1] * (old.dim() - 1)))
                    model_conds[key] = model_conds[key]._copy_with(torch.where(keep, old, value.to(old)))
            positive[0] = {**entry, "model_conds": model_conds}
        self._emit()

    # -- the schedules, after CFG ---------------------------------------------------------------------------
    def early_guidance(self, args: dict) -> torch.Tensor:
        """Post-CFG: the guided prediction; the steered images' at the early scale in a schedule's first steps."""
        denoised = args["denoised"]
        schedule = args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
        if schedule is None or schedule is not self._schedule or self.strategy not in SCHEDULES:
            return denoised
        step = step_index(schedule, float(args["sigma"].reshape(-1)[0]), 0)
        if step == 0 and not self._planned:
            self._planned = True
            self._plan_schedule(args, schedule)
        plan = self._plan
        if plan is None or not plan.applies(step) or plan.images.shape[0] != denoised.shape[0]:
            return denoised
        return early_guidance(denoised, args["cond_denoised"], args["uncond_denoised"], plan.images, plan.scale)

    def _plan_schedule(self, args, schedule) -> None:
        if args.get("uncond") is None or uncond_is_missing(args["uncond_denoised"]):
            self._report_skip("at cfg 1 there is no text guidance to steer")
            return
        base_model = args["model"]
        threshold, self.notes, detector = self._threshold(base_model, float(schedule.reshape(-1)[0]), args["input"],
                                                          embedded_guidance(args.get("cond")))
        if self.settings.mitigation == "auto" and threshold is None:
            return
        gap = step_score(guided_difference(args), detector)
        s = self.settings
        delay, scale = s.early_steps(self.strategy)
        self._plan, self.record = plan_guidance_delay(gap, schedule.numel() - 1, mode=s.mitigation,
                                                      threshold=threshold, target=s.target, delay=delay,
                                                      early_scale=scale)
        self._emit()

    def _threshold(self, base_model, first_sigma: float, x_in, embedded: Optional[float]):
        """(threshold, notes, detector) of this run: the explicit threshold, else the calibration of these weights;
        the score is its calibration's (memoguard.calibration_lookup.run_detector). embedded: the run's embedded
        guidance (Flux)."""
        s = self.settings
        if s.threshold is not None or s.mitigation != "auto":
            return s.threshold, [], run_detector(None)
        found = s.calibration.resolve(model_key(base_model))
        if found.calibration is None:
            self._report_skip(f"mode 'auto' has no threshold for this model: {found.problem}; or set threshold > 0")
            return None, [], run_detector(None)
        cal = found.calibration.at_noise_level(first_sigma)
        return (s.threshold_from(cal), cal.check(prediction_of(base_model), first_sigma, list(x_in.shape[1:]), window=1,
                                               embedded_guidance=embedded),
                run_detector(cal))

    def fail(self, error: BaseException) -> None:
        """Anything that went wrong (out of memory, an interrupt, a bug): the run samples the plain prompt."""
        self._plan = None  # a run that failed is not steered further
        self.error = failure_message("mitigating", error)
        log.error("%s", self.error, exc_info=error)
        release_memory(error)
        self._publish(f"mitigation failed, prompt unchanged ({self.error})")

    def summary(self) -> str:
        r = self.record
        if r is None:
            return self.error or "mitigation has not run yet"
        notes = "".join(f"; note: {n}" for n in self.notes)
        if not r.ran:
            scores = ", ".join(f"{x:.4f}" for x in r.before)
            return f"{r.strategy_name}: not run ({r.reason}); first-step score {scores}{notes}"
        lines = [r.summary(i) for i in range(len(r.before))]
        if len(set(lines)) == 1:
            return lines[0] + notes
        return "; ".join(f"image {i + 1}: {line}" for i, line in enumerate(lines)) + notes

    def _emit(self) -> None:
        """The record to the front end (the node's panel) and the summary on the node."""
        summary = self.summary()
        self.emit("mitigation", json_safe({"node": self.node_id, **self.record.to_dict(), "notes": list(self.notes),
                                           "summary": summary}))
        self._publish(summary)

    def _report_skip(self, reason: str) -> None:
        self.error = reason
        self._publish(f"no mitigation: {reason}")

    def _publish(self, text: str) -> None:
        self.show(f"MemoGuard: {text}", self.node_id)


def attach_mitigation(model, session: MitigationSession):
    """Clone-then-patch: a new MODEL that mitigates with the session's strategy (the wrapper decides it at each run's
    first model call; the post-CFG function steers the schedules)."""
    patched = model.clone()

    def memoguard_mitigation(executor, base_model, conds, x_in, timestep, model_options):
        try:
            session.at_model_call(base_model, conds, x_in, timestep, model_options)
        except Exception as e:
            session.fail(e)
        return executor(base_model, conds, x_in, timestep, model_options)

    def memoguard_early_guidance(args):
        try:
            return session.early_guidance(args)
        except Exception as e:
            session.fail(e)
            return args["denoised"]

    patched.add_wrapper_with_key(CALC_COND_BATCH, WRAPPER_KEY, memoguard_mitigation)
    patched.set_model_sampler_post_cfg_function(memoguard_early_guidance)
    register(patched, WRAPPER_KEY, session)
    return patched


def session_of(model):
    return _session_of(model, WRAPPER_KEY)
