"""One generation's MemoGuard state, fed by the WebUI's CFG callbacks.

Row layout A1111 hands to on_cfg_denoiser / on_cfg_denoised: the cond rows come first, grouped
per image (one row per AND sub-prompt, in the order of the MulticondLearnedConditioning), then
one uncond row per image. k-diffusion samplers output denoised x0 (x = x0 + sigma * eps), the
timestep samplers (DDIM, PLMS, UniPC) output eps and carry the timestep in `sigma`.
on_cfg_denoised has no sigma, so on_cfg_denoiser stashes it for the call that follows.
Forge fires on_cfg_denoiser only: ForgeRunMonitor reads the predictions from a post-CFG patch (forge.py).
"""
import math
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from memoguard import (MitigationRecord, ScoreTrace, Verdict, eps_difference, minimize_embedding, token_contributions,
                       uncond_is_missing)
from memoguard.calibration import Calibration
from memoguard.host_autograd import differentiable, ordinary
from memoguard.mitigate import check_settings
from memoguard.verdict import verdict_for

from . import forge
from .host_model import (KDIFFUSION, WebUIModel, cond_embedding, frozen_parameters, prompt_encodings, sampler_family,
                         with_embedding)

# A1111 writes these keys into p.extra_generation_params at a step whose uncond pass it skipped
# and puts copies of the cond rows where the uncond rows belong.
SKIPPED_UNCOND_KEYS = ("NGMS", "Skip Early CFG")
FORGE_CFG1_REASON = ("Forge skips the negative-prompt pass at CFG scale 1, so there is no gap to measure; "
                     "use a CFG scale other than 1 to score")


@dataclass
class Settings:
    window: int = 1                     # steps the score averages over, from the first
    threshold: Optional[float] = None   # overrides the calibration's threshold
    calibration: Optional[Calibration] = None
    fpr: float = 0.01
    explain: bool = False
    explain_steps: int = 1
    mitigation: str = "off"             # off | always | auto
    target: float = 0.0
    lr: float = 0.05
    max_iters: int = 10

    def __post_init__(self):
        if self.window < 1 or self.explain_steps < 1:
            raise ValueError(f"window and explanation steps must be >= 1 (got {self.window}, {self.explain_steps})")
        if not 0 < self.fpr < 1:
            raise ValueError(f"false-positive rate must be in (0, 1), got {self.fpr}")
        check_settings(self.mitigation, self.lr, self.max_iters, self.target)
        if self.mitigation == "auto" and self.flag_threshold() is None:
            raise ValueError("mitigation 'auto' needs a threshold or a calibration file to decide what is flagged")

    def flag_threshold(self) -> Optional[float]:
        if self.threshold is not None:
            return self.threshold
        return self.calibration.threshold(self.fpr) if self.calibration is not None else None


@dataclass
class Pending:
    """What on_cfg_denoiser saw, for the on_cfg_denoised call of the same model evaluation."""
    iteration: int
    step: int
    family: str
    layout: List[List[tuple]]   # per image: [(cond row, AND weight), ...]
    sigma: torch.Tensor         # per image (uncond rows)


@dataclass
class IterationResult:
    """One `batch_size` group of images (one pass of process_images' n_iter loop)."""
    trace: ScoreTrace = field(default_factory=ScoreTrace)
    skipped_steps: List[int] = field(default_factory=list)
    explanations: list = field(default_factory=list)   # per cond row: [TokenContributions per step]
    rows_per_image: List[List[int]] = field(default_factory=list)
    mitigation: Optional[MitigationRecord] = None
    embedding: Optional[torch.Tensor] = None            # the mitigated cond rows, used for every step


def cond_layout(denoiser) -> List[List[tuple]]:
    """conds_list as CFGDenoiser.forward builds it: rows numbered in order, per image."""
    multicond = denoiser.sampler.sampler_extra_args["cond"]
    layout, row = [], 0
    for composable in multicond.batch:
        layout.append([(row + k, float(c.weight)) for k, c in enumerate(composable)])
        row += len(composable)
    return layout


def guided_difference(x_out: torch.Tensor, layout, family: str, sigma: torch.Tensor) -> torch.Tensor:
    """eps_c - eps_u per image from the rows of one CFG evaluation; AND sub-prompts add with their weights."""
    batch = len(layout)
    uncond = x_out[-batch:]
    parameterization = "x0" if family == KDIFFUSION else "eps"
    out = []
    for i, rows in enumerate(layout):
        diff = None
        for row, weight in rows:
            d = eps_difference(x_out[row:row + 1], uncond[i:i + 1], parameterization, 1.0, sigma[i:i + 1])
            d = d if weight == 1.0 else weight * d
            diff = d if diff is None else diff + d
        out.append(diff)
    return torch.cat(out)


class RunMonitor:
    """Callbacks for one Script.run(). Every callback catches its own errors: sampling goes on."""

    def __init__(self, p, settings: Settings, shared_state=None):
        self.p, self.settings, self.state = p, settings, shared_state
        self.results: Dict[int, IterationResult] = {}
        self.errors: List[str] = []
        self.hires_seen = False
        self._pending: Optional[Pending] = None

    # -- callbacks ------------------------------------------------------------------------
    def on_cfg_denoiser(self, params) -> None:
        self._pending = None
        try:
            self._before(params)
        except Exception as e:  # never break the user's generation
            self._fail("before the model call", e)

    def on_cfg_denoised(self, params) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self._after(params, pending)
        except Exception as e:
            self._fail("after the model call", e)

    # -- internals ------------------------------------------------------------------------
    def _before(self, params) -> None:
        denoiser = params.denoiser
        if denoiser is None or getattr(denoiser, "p", None) is not self.p:
            return
        if getattr(self.p, "is_hr_pass", False):
            self.hires_seen = True
            return
        layout = cond_layout(denoiser)
        batch = len(layout)
        iteration = int(getattr(self.p, "iteration", 0))
        result = self.results.setdefault(iteration, IterationResult())
        step = int(denoiser.step)
        pending = Pending(iteration, step, self._family(denoiser), layout, params.sigma[-batch:])
        # a failing explanation or mitigation is reported; the step is still scored
        if step < self.settings.explain_steps and self.settings.explain:
            self._attempt("explaining tokens", self._explain, params, pending, result)
        if step == 0 and self.settings.mitigation != "off" and result.mitigation is None:
            self._attempt("mitigating", self._mitigate, params, pending, result)
        if result.embedding is not None:
            params.text_cond = with_embedding(params.text_cond, result.embedding)
        self._pending = pending

    def _family(self, denoiser) -> str:
        return sampler_family(denoiser)

    def _after(self, params, pending: Pending) -> None:
        if self._uncond_was_skipped(params.x, pending):
            self._skip(pending, self._skipped_keys_reason(pending))
        else:
            self._record(pending, guided_difference(params.x, pending.layout, pending.family, pending.sigma))

    def _record(self, pending: Pending, diff: torch.Tensor) -> None:
        result = self.results[pending.iteration]
        gaps = result.trace.record(pending.step, diff, float(pending.sigma[0]))
        if self.state is not None and not result.trace.unavailable:
            shown = ", ".join(f"{g:.4f}" for g in gaps[:4].tolist()) + (" ..." if len(gaps) > 4 else "")
            self.state.textinfo = f"MemoGuard step {pending.step + 1}: score {shown}"

    def _skip(self, pending: Pending, reason: str) -> None:
        """A step without an uncond pass: not recorded; inside the verdict window the score is unavailable."""
        result = self.results[pending.iteration]
        result.skipped_steps.append(pending.step)
        if pending.step < self.settings.window:
            result.trace.mark_unavailable(reason)

    def _skipped_keys_reason(self, pending: Pending) -> str:
        return (f"the WebUI skipped the negative-prompt pass at step {pending.step + 1} "
                f"({' / '.join(k for k in SKIPPED_UNCOND_KEYS if k in self.p.extra_generation_params)}), "
                "so there is no gap to measure; set NGMS / 'Skip Early CFG' to 0 to score")

    def _uncond_was_skipped(self, x_out, pending: Pending) -> bool:
        if not any(k in self.p.extra_generation_params for k in SKIPPED_UNCOND_KEYS):
            return False  # the usual case: no comparison, no device sync
        first_rows = [rows[0][0] for rows in pending.layout]
        return torch.equal(x_out[-len(pending.layout):], x_out[first_rows])

    @contextmanager
    def _gradient_inputs(self, params, pending: Pending):
        """(model, cond, uncond, x of the cond rows, t) for the core, with autograd kept off the host's weights."""
        model = WebUIModel(params.denoiser, pending.family, params.sigma[:1])
        cond, uncond = prompt_encodings(self.p, params, pending.layout, pending.iteration)
        with frozen_parameters(self.p.sd_model):
            yield model, cond, uncond, params.x[:cond.embedding.shape[0]], params.sigma[0]

    def _explain(self, params, pending: Pending, result: IterationResult) -> None:
        with self._gradient_inputs(params, pending) as (model, cond, uncond, x, _):
            contributions = token_contributions(model, cond, uncond, x, steps=1, total_steps=1)
        if not result.explanations:
            result.explanations = [[] for _ in contributions]
            result.rows_per_image = [[r for r, _ in rows] for rows in pending.layout]
        for row, c in enumerate(contributions):
            result.explanations[row].append(c)

    def _mitigate(self, params, pending: Pending, result: IterationResult) -> None:
        s = self.settings
        with self._gradient_inputs(params, pending) as (model, cond, uncond, x, t):
            embedding, record = minimize_embedding(model, cond, uncond, x, t, mode=s.mitigation,
                                                   threshold=s.flag_threshold(), target=s.target, lr=s.lr,
                                                   max_iters=s.max_iters)
        result.mitigation = record
        if record.ran:
            result.embedding = embedding.to(cond_embedding(params.text_cond).dtype)

    def _attempt(self, doing: str, action, *args) -> None:
        try:
            action(*args)
        except Exception as e:
            self._fail(doing, e)

    def _fail(self, where: str, error: Exception) -> None:
        message = f"MemoGuard failed {where}: {type(error).__name__}: {error}"
        if message not in self.errors:
            self.errors.append(message)
            print(message, file=sys.stderr)
            traceback.print_exc()
        if self.state is not None:
            self.state.textinfo = message

    # -- results --------------------------------------------------------------------------
    def verdicts(self, iteration: int) -> List[Verdict]:
        result = self.results.get(iteration)
        if result is None:
            reason = self.errors[0] if self.errors else "no sampling step of the first pass was seen"
            return [Verdict(False, reason=reason)] * int(getattr(self.p, "batch_size", 1))
        s = self.settings
        verdicts = verdict_for(result.trace, s.calibration, s.window, s.fpr, s.threshold)
        return verdicts * int(getattr(self.p, "batch_size", 1)) if len(verdicts) == 1 else verdicts

    def verdict(self, iteration: int, position: int) -> Verdict:
        verdicts = self.verdicts(iteration)
        return verdicts[position] if position < len(verdicts) else Verdict(False, reason="image not scored")

    def image_explanations(self, iteration: int, position: int):
        """Token contributions of one image, averaged over the explained steps, one per AND sub-prompt."""
        result = self.results.get(iteration)
        if result is None or not result.explanations or position >= len(result.rows_per_image):
            return []
        return [average_contributions(result.explanations[row]) for row in result.rows_per_image[position]]


class ForgeRunMonitor(RunMonitor):
    """Forge: on_cfg_denoiser as on A1111, the score from a post-CFG patch on the sampling's UNet."""

    def __init__(self, p, settings: Settings, shared_state=None):
        super().__init__(p, settings, shared_state)
        self.post_cfg = self._post_cfg_hook()

    def _post_cfg_hook(self):
        # A closure, not a bound method: UnetPatcher.clone() deep-copies model_options (and a method's object).
        def memoguard_post_cfg(args):
            pending, self._pending = self._pending, None
            if pending is not None:
                try:
                    self._after_post_cfg(args, pending)
                except Exception as e:  # never break the user's generation
                    self._fail("after the model call", e)
            return args["denoised"]
        return memoguard_post_cfg

    def _before(self, params) -> None:
        super()._before(params)
        if self._pending is not None:
            forge.install_post_cfg(params.denoiser, self.post_cfg)

    def _family(self, denoiser) -> str:
        return "forge"  # every Forge sampler calls the model in k-diffusion form (DDIM's timesteps become sigmas)

    def _after_post_cfg(self, args: dict, pending: Pending) -> None:
        cfg_one = math.isclose(float(self.p.cfg_scale), 1.0)
        if (cfg_one or any(k in self.p.extra_generation_params for k in SKIPPED_UNCOND_KEYS)) \
                and uncond_is_missing(args["uncond_denoised"]):  # Forge hands over zeros for a skipped pass
            self._skip(pending, FORGE_CFG1_REASON if cfg_one else self._skipped_keys_reason(pending))
        else:
            self._record(pending, forge.guided_difference(args))

    @contextmanager
    def _gradient_inputs(self, params, pending: Pending):
        kmodel = forge.forge_unet(params.denoiser).model
        forge.check_supported(kmodel)  # before touching the weights
        with differentiable(kmodel), frozen_parameters(kmodel):  # Forge samples under inference mode
            cond, uncond, x = forge.prompt_encodings(self.p, params, pending.layout, pending.iteration, ordinary)
            yield forge.ForgeModel(kmodel, ordinary(params.sigma[:1])), cond, uncond, x, ordinary(params.sigma[0])


def average_contributions(per_step):
    """The paper averages the token scores over the explained steps."""
    first = per_step[0]
    scores = [sum(c.scores[i] for c in per_step) / len(per_step) for i in range(len(first.scores))]
    return type(first)(first.tokens, scores, first.positions)
