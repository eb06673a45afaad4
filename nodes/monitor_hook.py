"""The Memorization Monitor's hook: reads the sampler's own cond/uncond predictions, never changes them.

ComfyUI hands a post-CFG function the denoised predictions D_c and D_u at x = x0 + sigma*eps
(rectified flow: x = x0 + sigma*v); memoguard.score turns them into eps_c - eps_u (flow: v_c - v_u).
The hook is a closure over a MonitorSession, not a bound method: ModelPatcher.clone() deep-copies
model_options, which copies a method's object but shares a plain function.
"""
import logging
import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from memoguard import Calibration, ScoreTrace, uncond_is_missing, verdict_for
from memoguard.calibration import Band
from memoguard.errors import MemoGuardError
from memoguard.hosts import HostSettings, denoised_difference

from . import live
from memoguard.calibration_lookup import CalibrationLookup, run_detector

from .calibration_choice import embedded_guidance, lookup, model_key, prediction_of

log = logging.getLogger("memoguard")

ACTIONS = ("none", "warn", "stop")
SESSION_KEY = "memoguard_monitor"  # model_options entry naming the session (a string survives clone())
CFG1_MESSAGE = ("ComfyUI skips the unconditional pass at cfg 1 and this sampler has no negative conditioning "
                "(e.g. BasicGuider) for MemoGuard to run it with: use a CFGGuider or KSampler with an empty "
                "negative prompt, or turn on 'force_uncond_at_cfg1'")
CFG1_NOTE = "cfg 1: MemoGuard ran the negative prompt's pass itself at the scored steps (1 extra model call each)"
PREDICT_NOISE = "predict_noise"  # comfy.patcher_extension.WrappersMP.PREDICT_NOISE
WRAPPER_KEY = "memoguard_monitor_cfg1"
MAX_SESSIONS = 64


class MemorizationFlagged(MemoGuardError, RuntimeError):
    """Raised from the hook when the action is 'stop': ComfyUI ends the queue item with this message."""


@dataclass
class MonitorSettings(HostSettings):
    """The core's settings (window, fpr, threshold) plus what only the Monitor node has."""
    calibration: CalibrationLookup = field(default_factory=lookup)
    action: str = "warn"
    force_uncond_at_cfg1: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")


@dataclass
class RunContext:
    """What one sampling run is judged against; resolved once, at the run's first step."""
    key: Optional[str] = None
    calibration: Optional[Calibration] = None
    threshold: Optional[float] = None
    source: str = ""                      # where the calibration came from, or why there is none
    notes: List[str] = field(default_factory=list)  # how this run differs from the calibration
    band: Optional[Band] = None           # None when absent or not applicable to this run
    images: int = 1

    @property
    def hint(self) -> str:
        return self.source


def resolve_run(settings: MonitorSettings, base_model, first_sigma: float, latent_shape, cond_scale,
                embedded: Optional[float] = None) -> RunContext:
    """The calibration, threshold, notes and band of a run on `base_model` starting at `first_sigma`; embedded: the
    run's embedded guidance (Flux), compared with the calibration's."""
    ctx = RunContext(images=int(latent_shape[0]))
    try:
        ctx.key = model_key(base_model) if settings.calibration.choice != "none" else None
    except Exception as e:  # an odd model: no calibration, said so
        log.exception("MemoGuard could not fingerprint the model")
        ctx.source = f"could not identify the model's weights ({type(e).__name__}: {e})"
    else:
        found = settings.calibration.resolve(ctx.key)
        ctx.source = found.message
        if found.calibration is not None:
            cal = found.calibration.at_noise_level(first_sigma)
            ctx.calibration = cal
            ctx.notes = cal.check(prediction_of(base_model), first_sigma, list(latent_shape[1:]), cond_scale,
                                  settings.window, embedded)
            ctx.band = cal.band if cal.band is not None and cal.band.serves(cond_scale) else None
    ctx.threshold = settings.threshold_from(ctx.calibration)
    return ctx


def guided_difference(args: dict) -> torch.Tensor:
    """eps_c - eps_u (a rectified flow's v_c - v_u) per image from a post-CFG call's denoised predictions (the
    Monitor and delayed guidance)."""
    return denoised_difference(args["cond_denoised"], args["uncond_denoised"], args["sigma"])


def step_index(sample_sigmas: Optional[torch.Tensor], sigma: float, fallback: int) -> int:
    """The step whose interval [sigma_i, sigma_i+1) holds sigma; `fallback` when the sampler gave no schedule."""
    if sample_sigmas is None or sample_sigmas.numel() < 2:
        return fallback
    schedule = sample_sigmas.detach().float().cpu()
    at_or_below = (schedule[:-1] <= sigma * (1 + 1e-5)).nonzero()
    return int(at_or_below[0]) if len(at_or_below) else len(schedule) - 2


class MonitorSession:
    """The score trace of the latest sampling run through one Monitor, plus what the user was shown."""

    def __init__(self, settings: MonitorSettings, node_id=None,
                 emit: Callable[[str, dict], None] = live.send, show: Callable[[str, object], None] = live.show_text):
        self.id = uuid.uuid4().hex
        self.settings, self.node_id, self.emit, self.show = settings, node_id, emit, show
        self.trace = ScoreTrace()
        self.runs = 0
        self.error: Optional[str] = None
        self.verdicts = []
        self.ctx: Optional[RunContext] = None
        self.total: Optional[int] = None
        self._bands: list = []
        self._schedule = None
        self._calls = 0
        self._own_uncond = None  # (sigma, uncond prediction) MemoGuard computed for this step at cfg 1

    # -- one sampler call -------------------------------------------------------------
    def before_prediction(self, guider, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> None:
        """At cfg 1 ComfyUI skips the negative prompt's pass: run it for the steps the verdict reads (the first
        `window`), so that the Monitor scores at one extra model call a scored step; the sampler's own passes and
        the image are untouched."""
        self._own_uncond = None
        negative = guider.conds.get("negative")
        if (not math.isclose(float(guider.cfg), 1.0) or model_options.get("disable_cfg1_optimization", False)
                or negative is None):
            return
        sigma = float(timestep.reshape(-1)[0])
        schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
        if step_index(schedule, sigma, self._calls) >= self.settings.window:
            return
        import comfy.samplers
        (uncond,) = comfy.samplers.calc_cond_batch(guider.inner_model, [negative], x, timestep, model_options)
        self._own_uncond = (sigma, uncond)

    def observe(self, args: dict) -> None:
        sigma_t = args["sigma"]
        sigma = float(sigma_t.reshape(-1)[0])
        schedule = args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
        step = step_index(schedule, sigma, self._calls)
        last = self.trace.step_indices()[-1] if len(self.trace) else None
        if self.runs == 0 or schedule is not self._schedule or (last is not None and step < last):
            self._start_run(schedule, args, sigma)
            last = None
        self._calls += 1
        if self.trace.unavailable:
            return
        own, self._own_uncond = self._own_uncond, None
        if args.get("uncond") is None and own is not None and own[0] == sigma:
            args = {**args, "uncond_denoised": own[1]}
            if CFG1_NOTE not in self.ctx.notes:
                self.ctx.notes.append(CFG1_NOTE)
        elif args.get("uncond") is None and len(self.trace) >= self.settings.window:
            return  # cfg 1: the verdict's steps are scored; the rest of the run has no unconditional pass
        elif args.get("uncond") is None or (len(self.trace) == 0 and uncond_is_missing(args["uncond_denoised"])):
            self.trace.mark_unavailable(CFG1_MESSAGE)
            self._publish_unavailable(CFG1_MESSAGE)
            return
        if last is not None and last >= step:
            return  # a second model call inside the same step (Heun, DPM2): keep the step's first
        rms = self.trace.record(step, guided_difference(args), sigma)
        band = self._band_at(args["model"], sigma)
        self._bands.append(band)
        decided = len(self.trace) == self.settings.window
        if decided:
            self.verdicts = self.final_verdicts()
        self.emit("step", {"node": self.node_id, "run": self.runs, "step": step, "total": self.total,
                           "score": json_safe(rms.tolist()), "sigma": sigma, "band": band,
                           "window": self.settings.window, "threshold": _finite_or_none(self.ctx.threshold),
                           "label": self.label()})
        if decided:
            self._decide()

    def fail(self, error: BaseException) -> None:
        """A bug or odd input inside the hook: report once, stop scoring, let sampling go on."""
        if self.error is None:
            self.error = f"{type(error).__name__}: {error}"
            log.exception("MemoGuard monitor failed; sampling continues without a score")
            self.trace.mark_unavailable(f"monitor error ({self.error})")
            self._publish_unavailable(self.trace.unavailable)

    # -- after a run ------------------------------------------------------------------
    def final_verdicts(self, images: Optional[int] = None):
        """One verdict per image over the window (or over every step if the run was shorter)."""
        ctx = self.ctx or RunContext(source="no sampling run went through this Monitor yet", images=images or 1)
        window = max(1, min(self.settings.window, len(self.trace)))
        return verdict_for(self.trace, ctx.calibration, window, self.settings.fpr, self.settings.threshold,
                           images=images or ctx.images, uncalibrated_hint=ctx.hint, notes=ctx.notes)

    def label(self, verdicts=None) -> str:
        """ok | flagged | uncalibrated | unavailable for the run (any image flagged: flagged); 'pending'
        while the verdict window is still running."""
        if self.trace.unavailable:
            return "unavailable"
        if self.ctx is None or self.ctx.threshold is None:
            return "uncalibrated"
        verdicts = self.verdicts if verdicts is None else verdicts
        if not verdicts:
            return "pending"
        labels = {v.label for v in verdicts}
        for label in ("flagged", "ok", "uncalibrated"):
            if label in labels:
                return label
        return "unavailable"

    def to_dict(self, images: Optional[int] = None) -> dict:
        verdicts = self.final_verdicts(images)
        ctx = self.ctx or RunContext()
        trace = self.trace.to_dict()
        return json_safe({"node": self.node_id, "run": self.runs, "total": self.total, "trace": trace,
                          "sigma": trace["t"], "band": list(self._bands), "window": self.settings.window,
                          "threshold": _finite_or_none(ctx.threshold),
                          "summary": "; ".join(v.summary() for v in verdicts), "label": self.label(verdicts),
                          "verdicts": [v.to_dict() for v in verdicts], "notes": list(ctx.notes),
                          "calibration": ctx.source, "model_key": ctx.key, "error": self.error})

    # -- internals ----------------------------------------------------------------------
    def _start_run(self, schedule, args, sigma) -> None:
        self.verdicts, self.error, self._bands = [], None, []
        self._schedule, self._calls = schedule, 0
        self.runs += 1
        self.total = None if schedule is None else schedule.numel() - 1
        first = sigma if schedule is None else float(schedule.reshape(-1)[0])
        self.ctx = resolve_run(self.settings, args["model"], first, tuple(args["input"].shape), args.get("cond_scale"),
                               embedded_guidance(args.get("cond")))
        self.trace = ScoreTrace(detector=run_detector(self.ctx.calibration))  # scored as its calibration is

    def _band_at(self, base_model, sigma: float):
        band = self.ctx.band
        if band is None:
            return None
        at = band.at(sigma)
        return None if at is None else [at[0], at[1]]

    def _decide(self) -> None:
        summary = "; ".join(v.summary() for v in self.verdicts)
        flagged = any(v.flagged for v in self.verdicts)
        self.emit("verdict", json_safe({"node": self.node_id, "run": self.runs, "flagged": flagged,
                                        "summary": summary, "verdicts": [v.to_dict() for v in self.verdicts],
                                        "notes": list(self.ctx.notes)}))
        self.show(f"MemoGuard: {summary}", self.node_id)
        if flagged and self.settings.action == "warn":
            log.warning("MemoGuard: %s", summary)
        if flagged and self.settings.action == "stop":
            raise MemorizationFlagged(f"MemoGuard stopped this generation: {summary}")

    def _publish_unavailable(self, reason: str) -> None:
        self.verdicts = self.final_verdicts()
        notes = list(self.ctx.notes) if self.ctx is not None else []
        self.emit("verdict", json_safe({"node": self.node_id, "run": self.runs, "flagged": False,
                                        "summary": f"score unavailable: {reason}",
                                        "verdicts": [v.to_dict() for v in self.verdicts], "notes": notes}))
        self.show(f"MemoGuard: score unavailable: {reason}", self.node_id)


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


_sessions: "OrderedDict[str, object]" = OrderedDict()


def register(model, key: str, session) -> None:
    """Name `session` in the model's options (a string survives clone()) and keep the newest few."""
    model.model_options[key] = session.id
    _sessions[session.id] = session
    while len(_sessions) > MAX_SESSIONS:
        _sessions.popitem(last=False)


def session_of(model, key: str = SESSION_KEY):
    """The session a (possibly cloned again) MODEL carries under `key`, or None."""
    return _sessions.get(model.model_options.get(key))


def json_safe(value):
    """NaN/inf become None: the browser's JSON.parse rejects them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def attach_monitor(model, session: MonitorSession):
    """Clone-then-patch: a new MODEL whose sampler reports to `session`; `model` is untouched."""
    def memoguard_monitor(args):
        try:
            session.observe(args)
        except MemorizationFlagged:
            raise
        except Exception as e:  # the user's image matters more than our score
            session.fail(e)
        return args["denoised"]

    def memoguard_cfg1_uncond(executor, x, timestep, model_options={}, seed=None):
        try:
            session.before_prediction(executor.class_obj, x, timestep, model_options)
        except Exception as e:
            session.fail(e)
        return executor(x, timestep, model_options, seed)

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(memoguard_monitor,
                                                disable_cfg1_optimization=session.settings.force_uncond_at_cfg1)
    patched.add_wrapper_with_key(PREDICT_NOISE, WRAPPER_KEY, memoguard_cfg1_uncond)
    register(patched, SESSION_KEY, session)
    return patched
