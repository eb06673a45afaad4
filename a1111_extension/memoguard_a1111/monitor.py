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
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch

from memoguard import (MitigationRecord, ScoreTrace, Verdict, eps_difference, minimize_embedding, step_score,
                       token_contributions, uncond_is_missing)
from memoguard.explain import REENCODED_METHODS, average_contributions
from memoguard.calibration import Calibration
from memoguard.calibration_lookup import run_detector
from memoguard.host_autograd import differentiable, ordinary
from memoguard.hosts import (HostSettings, combine_rows, failure_message, noise_level_vp,
                             release_memory, cond_for_early_guidance, early_guidance)
from memoguard.mitigate import (DEFAULT_WITHOUT_PROMPT, GuidanceDelay, MitigationError, mask_padding, plan_guidance_delay,
                               remove_tokens)
from memoguard.verdict import verdict_for

from . import calibrate as calibration_glue
from . import forge
from .host_model import (KDIFFUSION, TIMESTEPS, WebUIModel, a1111_prompt_text, cond_embedding, frozen_parameters,
                         prompt_encodings, sampler_family, webui_chunker, with_embedding)
from .model_identity import model_key

# A1111 writes these keys into p.extra_generation_params at a step whose uncond pass it skipped
# and puts copies of the cond rows where the uncond rows belong.
SKIPPED_UNCOND_KEYS = ("NGMS", "Skip Early CFG")

FORGE_CFG1_REASON = ("Forge skips the negative-prompt pass at CFG scale 1, and MemoGuard's own pass failed (see "
                     "MemoGuard error); use a CFG scale other than 1 to score")
FORGE_CFG1_NOTE = ("CFG scale 1: MemoGuard ran the negative prompt's pass itself at the scored steps (1 extra model "
                   "call each)")


@dataclass
class Settings(HostSettings):
    """The core's settings plus the WebUI's own: the explanation switch and an explicit calibration file."""
    explain: bool = False
    calibration_file: str = ""          # explicit calibration (must be this model's); else found by model key
    training_images: str = ""           # copy evidence: a folder of models/memoguard_training ("" or "(none)": off)


@dataclass
class Pending:
    """What on_cfg_denoiser saw, for the on_cfg_denoised call of the same model evaluation."""
    iteration: int
    step: int
    family: str
    layout: List[List[tuple]]   # per image: [(cond row, AND weight), ...]
    sigma: torch.Tensor         # per image (uncond rows)
    total: int = 0              # sampling steps of this pass


@dataclass
class IterationResult:
    """One `batch_size` group of images (one pass of process_images' n_iter loop)."""
    trace: ScoreTrace = field(default_factory=ScoreTrace)
    skipped_steps: List[int] = field(default_factory=list)
    explanations: list = field(default_factory=list)   # per cond row: [TokenContributions per step]
    rows_per_image: List[List[int]] = field(default_factory=list)
    mitigation: Optional[MitigationRecord] = None       # per image (AND sub-prompts combined)
    embedding: Optional[torch.Tensor] = None            # the mitigated cond rows, used for every step
    vector: Optional[torch.Tensor] = None               # SDXL: their pooled vectors where token removal changed them
    delay: Optional[GuidanceDelay] = None               # guidance_delay: which images, how many steps
    explain_note: str = ""                              # why the explanation did not re-encode the prompts
    levels: List[float] = field(default_factory=list)   # noise level (sigma / alpha) of each recorded step
    latent: Optional[tuple] = None                      # (C, H, W) of the sampled latent


def cond_layout(denoiser) -> List[List[tuple]]:
    """conds_list as CFGDenoiser.forward builds it: rows numbered in order, per image."""
    multicond = denoiser.sampler.sampler_extra_args["cond"]
    layout, row = [], 0
    for composable in multicond.batch:
        layout.append([(row + k, float(c.weight)) for k, c in enumerate(composable)])
        row += len(composable)
    return layout


def and_weights(layout) -> List[List[float]]:
    return [[weight for _, weight in rows] for rows in layout]


def guided_difference(x_out: torch.Tensor, layout, family: str, sigma: torch.Tensor) -> torch.Tensor:
    """eps_c - eps_u per image from the rows of one CFG evaluation; AND sub-prompts add with their weights."""
    batch = len(layout)
    image_of_row = [i for i, rows in enumerate(layout) for _ in rows]
    n_rows = len(image_of_row)
    parameterization = "x0" if family == KDIFFUSION else "eps"
    diff_rows = eps_difference(x_out[:n_rows], x_out[-batch:][image_of_row], parameterization, 1.0,
                               sigma[image_of_row])
    return combine_rows(diff_rows, and_weights(layout))


def single_prompt_images(layout) -> bool:
    return all(len(rows) == 1 and rows[0][1] == 1.0 for rows in layout)


class RunMonitor:
    """Callbacks for one Script.run(). Every callback catches its own errors: sampling goes on."""

    def __init__(self, p, settings: Settings, shared_state=None):
        self.p, self.settings, self.state = p, settings, shared_state
        self.entry = ""                         # which MemoGuard entry started it (dropdown or accordion)
        self.results: Dict[int, IterationResult] = {}
        self.errors: List[str] = []
        self.evidence = None  # memoguard_a1111.evidence.RunEvidence when copy evidence is on
        self.hires_seen = False
        self._pending: Optional[Pending] = None
        # which model this is and its calibration: resolved once, after the run's first model call
        self.model_key: Optional[str] = None
        self.calibration: Optional[Calibration] = None
        self.calibration_source = ""            # where the calibration came from
        self.calibration_problem = ""           # why none applies (other model's file, corrupt file ...)
        self._resolved = False
        self._verdicts: Dict[int, tuple] = {}

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
        if result.latent is None:
            result.latent = tuple(params.x.shape[1:])
        step = int(denoiser.step)
        total = int(getattr(params, "total_sampling_steps", 0) or 0) or int(getattr(self.p, "steps", 0) or 0)
        pending = Pending(iteration, step, self._family(denoiser), layout, params.sigma[-batch:], total)
        # a failing explanation or mitigation is reported; the step is still scored
        if step < self.settings.explain_steps and self.settings.explain:
            self._attempt("explaining tokens", self._explain, params, pending, result)
        if step == 0 and self.settings.changes_prompt and result.mitigation is None:
            self._attempt("mitigating", self._mitigate, params, pending, result)
        if result.embedding is not None:
            params.text_cond = with_embedding(params.text_cond, result.embedding, result.vector)
        self._pending = pending

    def _family(self, denoiser) -> str:
        return sampler_family(denoiser)

    def _after(self, params, pending: Pending) -> None:
        if self._uncond_was_skipped(params.x, pending):
            self._skip(pending, self._skipped_keys_reason(pending))
        else:
            self._record(pending, guided_difference(params.x, pending.layout, pending.family, pending.sigma))
        self.resolve_calibration()  # after the first model call: A1111's Lora has merged its weights by now
        images = self._delayed_images(pending)
        if images:  # the cond rows CFG then turns into the schedule's guidance for those images
            x_out, uncond_rows, scale = params.x, len(pending.layout), self.results[pending.iteration].delay.scale
            for i in images:
                u = x_out[x_out.shape[0] - uncond_rows + i]
                for row, _ in pending.layout[i]:
                    x_out[row] = cond_for_early_guidance(x_out[row], u, scale, float(self.p.cfg_scale))

    def _delayed_images(self, pending: Pending) -> List[int]:
        """The schedules: plans at the first scored step, then the images steered at this step."""
        s = self.settings
        if not s.delays:
            return []
        result = self.results[pending.iteration]
        if result.mitigation is None:
            if pending.step != 0 or result.trace.unavailable or not len(result.trace):
                return []
            self._attempt("planning the early guidance", self._plan_delay, pending, result)
        plan = result.delay
        if plan is None or not plan.applies(pending.step):
            return []
        return [i for i, on in enumerate(plan.images.tolist()) if on]

    def _plan_delay(self, pending: Pending, result: IterationResult) -> None:
        s = self.settings
        gaps = result.trace.per_step()[0]
        threshold = self.flag_threshold(result) if s.mitigation == "auto" else None
        if s.mitigation == "auto" and threshold is None:
            result.mitigation = MitigationRecord("auto", False, before=gaps.tolist(), after=gaps.tolist(),
                                                 image_iterations=[0] * len(gaps), strategy=s.strategy,
                                                 reason="no calibration of this checkpoint and no threshold")
            return
        delay, scale = s.early_steps(s.strategy)
        result.delay, result.mitigation = plan_guidance_delay(gaps, max(1, pending.total), mode=s.mitigation,
                                                              threshold=threshold, target=s.target, delay=delay,
                                                              early_scale=scale)

    def _noise_level(self, pending: Pending, t: float) -> float:
        """sigma / alpha of the step: the k-diffusion sigma; a timestep sampler's t through alphas_cumprod."""
        return noise_level_vp(self.p.sd_model.alphas_cumprod, t) if pending.family == TIMESTEPS else t

    def _record(self, pending: Pending, diff: torch.Tensor) -> None:
        result = self.results[pending.iteration]
        t = float(pending.sigma[0])
        recorded = len(result.trace)
        if not recorded:  # looked up after the first model call, which merges LoRAs
            self.resolve_calibration()
            self._score_detector(result)
        gaps = result.trace.record(pending.step, diff, t)
        if len(result.trace) > recorded:
            result.levels.append(self._noise_level(pending, t))
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
    def _gradient_inputs(self, params, pending: Pending, reencode: bool = False):
        """(model, cond, uncond, x of the cond rows, t) for the core, with autograd kept off the host's weights;
        reencode: let the model re-encode the prompts where the host's text encoding gives the sampler's
        conditioning (else model.reencode_note says why not)."""
        model = WebUIModel(params.denoiser, pending.family)
        cond, uncond = prompt_encodings(self.p, params, pending.layout, pending.iteration)
        with frozen_parameters(self.p.sd_model):
            yield (model, self._reencodable(model, cond, lambda: a1111_prompt_text(self.p, webui_chunker()), reencode),
                   uncond, params.x[:cond.embedding.shape[0]], params.sigma[0])

    @staticmethod
    def _reencodable(model, cond, prompt_text, reencode: bool):
        if not reencode:
            return replace(cond, texts=None)
        try:
            return model.reencodable(cond, prompt_text())
        except Exception as e:  # the explanation goes on without re-encoding, and says why
            model.reencode_note = f"re-encoding failed: {type(e).__name__}: {e}"
            return replace(cond, texts=None)

    def _explain(self, params, pending: Pending, result: IterationResult) -> None:
        method = self.settings.explain_method
        with self._gradient_inputs(params, pending, method in REENCODED_METHODS) as (model, cond, uncond, x, t):
            contributions = token_contributions(model, cond, uncond, x, steps=1, total_steps=1, timesteps=[t],
                                                method=method, should_stop=self.interrupted,
                                                detector=self._score_detector(result))
        result.explain_note = model.reencode_note
        if not result.explanations:
            result.explanations = [[] for _ in contributions]
            result.rows_per_image = [[r for r, _ in rows] for rows in pending.layout]
        for row, c in enumerate(contributions):
            result.explanations[row].append(c)

    def _mitigate(self, params, pending: Pending, result: IterationResult) -> None:
        """Change the prompt rows of the images to mitigate (minimize: optimise them; mask_padding: zero their
        padding; remove_tokens: encode them again without words); the record is per image (AND rows combined)."""
        s, layout = self.settings, pending.layout
        # auto mode looks the calibration up for its threshold: the scores it is compared with are of its detector
        threshold = (self.flag_threshold(result, self._noise_level(pending, float(pending.sigma[0])))
                     if s.mitigation == "auto" else None)
        detector = self._score_detector(result)
        with self._gradient_inputs(params, pending, s.strategy == "remove_tokens") as (model, cond, uncond, x, t):
            with torch.no_grad():
                before, eps_u, row_gaps = self._image_gaps(model, cond, uncond, x, t, layout, cond.embedding, detector)
            images = list(range(len(layout)))
            if s.mitigation == "auto":  # decided on each image's own (combined) score; weights are final now
                if threshold is None:
                    result.mitigation = MitigationRecord("auto", False, before=before, after=before,
                                                         image_iterations=[0] * len(layout), strategy=s.strategy,
                                                         reason="no calibration of this checkpoint and no threshold")
                    return
                images = [i for i in images if before[i] >= threshold]
                if not images:
                    result.mitigation = MitigationRecord("auto", False, before=before, after=before,
                                                         image_iterations=[0] * len(layout), strategy=s.strategy,
                                                         reason=f"first-step score under threshold {threshold:.4g}")
                    return
            rows_of = [[r for r, _ in rows] for rows in layout]
            rows = [r for i in images for r in rows_of[i]]
            first_step = (eps_u[rows], row_gaps[rows])  # the core starts from this step's scores, not again
            vector = None  # SDXL's pooled vectors, where token removal changes them
            if s.strategy == "mask_padding":
                masked, sub = mask_padding(model, cond.rows(rows), uncond.rows(rows), x[rows], t, mode="always",
                                           target=s.target, first_step=first_step, detector=detector)
                sub_emb = masked.embedding
            elif s.strategy == "remove_tokens":
                if not model.can_reencode(cond):
                    raise MitigationError("token removal encodes the prompt again without words, which is not "
                                          f"possible here: {model.reencode_note}")
                shorter, sub = remove_tokens(model, cond.rows(rows), uncond.rows(rows), x[rows], t, mode="always",
                                             target=s.target, should_stop=self.interrupted, first_step=first_step,
                                             detector=detector)
                sub_emb = shorter.embedding
                pooled = shorter.extra.get("vector", shorter.extra.get("y"))  # SDXL: A1111's / Forge's name
                if pooled is not None:
                    vector = params.text_cond["vector"].clone()
                    vector[rows] = pooled.to(vector)
            else:
                sub_emb, sub = minimize_embedding(model, cond.rows(rows), uncond.rows(rows), x[rows], t,
                                                  mode="always", target=s.target, lr=s.lr, max_iters=s.max_iters,
                                                  should_stop=self.interrupted, first_step=first_step,
                                                  detector=detector)
            embedding = cond.embedding.detach().clone()
            embedding[rows] = sub_emb.to(embedding.dtype)
            if not sub.ran:
                after = before
            elif single_prompt_images(layout):  # one row per image: the core's per-row numbers are the image's
                after = list(before)
                for k, i in enumerate(images):
                    after[i] = sub.after[k]
            else:
                with torch.no_grad():
                    after = self._image_gaps(model, cond, uncond, x, t, layout, embedding, detector)[0]
        row_moves = dict(zip(rows, sub.image_iterations))
        row_masked = dict(zip(rows, sub.masked))
        row_removed = dict(zip(rows, sub.removed))
        row_padded = dict(zip(rows, sub.padded))
        per_image = lambda of: [max([of.get(r, 0) for r in rs] or [0]) for rs in rows_of]
        result.mitigation = MitigationRecord(s.mitigation, sub.ran, sub.iterations, per_image(row_moves),
                                             sub.losses, before, after, sub.reason, strategy=s.strategy,
                                             masked=per_image(row_masked),
                                             removed=[[w for r in rs for w in row_removed.get(r, [])] for rs in rows_of],
                                             padded=[any(row_padded.get(r, False) for r in rs) for rs in rows_of])
        if sub.ran:
            result.embedding = embedding.to(cond_embedding(params.text_cond).dtype)
            result.vector = vector

    @staticmethod
    def _image_gaps(model, cond, uncond, x, t, layout, embedding, detector):
        """First-step score of each image with the cond rows at `embedding`, AND sub-prompts combined; and the
        unconditional eps and the score of each row, which the core's strategies start from."""
        eps_c, eps_u = model.eps_pair(x, t, cond, uncond, embedding)
        images = step_score(combine_rows(eps_c - eps_u, and_weights(layout)), detector).float().cpu().tolist()
        return images, eps_u, step_score(eps_c - eps_u, detector).float().cpu()

    def interrupted(self) -> bool:
        """The WebUI's Interrupt / Skip: MemoGuard's own loops stop at once, then the sampler does."""
        return self.state is not None and bool(getattr(self.state, "interrupted", False) or
                                               getattr(self.state, "skipped", False))

    def _attempt(self, doing: str, action, *args) -> None:
        try:
            action(*args)
        except Exception as e:
            self._fail(doing, e)

    def _fail(self, where: str, error: Exception) -> None:
        """Said once in the infotext, the console and the progress text; memory it held is freed."""
        message = failure_message(where, error)
        if message not in self.errors:
            self.errors.append(message)
            print(message, file=sys.stderr)
            traceback.print_exc()
        release_memory(error)
        if self.state is not None:
            self.state.textinfo = message

    # -- calibration ----------------------------------------------------------------------
    def prediction(self) -> str:
        return calibration_glue.prediction_of(self.p.sd_model)

    def resolve_calibration(self) -> None:
        """Key of the weights being sampled, and the calibration made for that key (never another model's)."""
        if self._resolved:
            return
        self._resolved = True
        try:
            self.model_key = self._model_key()
        except Exception as e:
            self.calibration_problem = f"the model could not be identified ({type(e).__name__}: {e})"
            return
        found = calibration_glue.lookup(self.settings.calibration_file).resolve(self.model_key)
        self.calibration, self.calibration_source = found.calibration, found.source
        if not found.absent:  # a file refused or broken: said, never silently skipped
            self.calibration_problem = found.problem

    def _model_key(self) -> str:
        return model_key(self.p.sd_model)

    def first_level(self, result: IterationResult) -> Optional[float]:
        return result.levels[0] if result.levels else None

    def calibration_for(self, result: IterationResult, level: Optional[float] = None) -> Optional[Calibration]:
        self.resolve_calibration()
        level = self.first_level(result) if level is None else level
        return None if self.calibration is None else self.calibration.at_noise_level(level)

    def _score_detector(self, result: IterationResult) -> str:
        """The iteration's score: its calibration's once the calibration is looked up (an empty trace takes it then),
        else the default; explanation and mitigation at step 0 read the score the verdict reads."""
        if not len(result.trace) and not result.trace.unavailable and self._resolved:
            result.trace = ScoreTrace(detector=run_detector(self.calibration))
        return result.trace.detector

    def flag_threshold(self, result: IterationResult, level: Optional[float] = None) -> Optional[float]:
        if self.settings.threshold is not None:
            return self.settings.threshold
        return self.settings.threshold_from(self.calibration_for(result, level))

    def notes(self, result: IterationResult) -> List[str]:
        """How this run differs from its calibration in ways that change the score."""
        calibration = self.calibration_for(result)
        if calibration is None:
            return []
        return calibration.check(self.prediction(), self.first_level(result), result.latent,
                                 window=self.settings.window)

    def scoring_notes(self) -> List[str]:
        """How MemoGuard got the score beyond the sampler's own passes (infotext and panel)."""
        return []

    def uncalibrated_hint(self) -> str:
        problem = f"{self.calibration_problem}; " if self.calibration_problem else ""
        which = f" ({self.model_key})" if self.model_key else ""
        return f"{problem}no calibration for this checkpoint{which}: {calibration_glue.HOW_TO}"

    # -- results --------------------------------------------------------------------------
    def verdicts(self, iteration: int) -> List[Verdict]:
        batch = int(getattr(self.p, "batch_size", 1))
        result = self.results.get(iteration)
        if result is None:
            reason = self.errors[0] if self.errors else "no sampling step of the first pass was seen"
            return [Verdict(False, reason=reason) for _ in range(batch)]
        cached = self._verdicts.get(iteration)
        if cached is not None and cached[0] == len(result.trace):
            return cached[1]
        s = self.settings
        verdicts = verdict_for(result.trace, self.calibration_for(result), s.window, s.fpr, s.threshold, images=batch,
                               uncalibrated_hint=self.uncalibrated_hint(), notes=self.notes(result))
        self._verdicts[iteration] = (len(result.trace), verdicts)
        return verdicts

    def verdict(self, iteration: int, position: int) -> Verdict:
        return self.verdicts(iteration)[position]

    def explain_note(self, iteration: int) -> str:
        """Why this iteration's explanation did not re-encode its prompts ("" where it did or did not need to)."""
        result = self.results.get(iteration)
        return result.explain_note if result is not None else ""

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
        self._own_uncond: Optional[torch.Tensor] = None  # CFG 1: the negative prompt's prediction MemoGuard ran
        self._negatives: Dict[int, object] = {}  # CFG 1: the negative conditioning MemoGuard encoded, per iteration
        self.cfg1_scored = False
        self.flow_notes: List[str] = []  # what a flow model made MemoGuard do otherwise than asked (_flow_limits)

    def _post_cfg_hook(self):
        # A closure, not a bound method: UnetPatcher.clone() deep-copies model_options (and a method's object).
        def memoguard_post_cfg(args):
            pending, self._pending = self._pending, None
            if pending is None:
                return args["denoised"]
            try:
                self._after_post_cfg(args, pending)
                images = self._delayed_images(pending)
            except Exception as e:  # never break the user's generation
                self._fail("after the model call", e)
                return args["denoised"]
            if not images:
                return args["denoised"]
            marked = torch.zeros(args["denoised"].shape[0], dtype=torch.bool)
            marked[images] = True
            scale = self.results[pending.iteration].delay.scale
            return early_guidance(args["denoised"], args["cond_denoised"], args["uncond_denoised"], marked, scale)
        return memoguard_post_cfg

    def _before(self, params) -> None:
        if getattr(params.denoiser, "p", None) is self.p:
            if (self.settings.changes_prompt or self.settings.explain) and forge.is_rectified_flow(
                    forge.forge_unet(params.denoiser).model):
                self._flow_limits()
        super()._before(params)
        self._own_uncond = None
        if self._pending is not None:
            forge.install_post_cfg(params.denoiser, self.post_cfg)
            if params.text_uncond is None and self._pending.step < self.settings.window:
                self._attempt("running the negative prompt's pass at CFG scale 1", self._negative_pass, params,
                              forge.forge_unet(params.denoiser))

    def _negative_pass(self, params, unet) -> None:
        self._own_uncond = forge.negative_prediction(params, unet, self._negative(params, unet))

    def _negative(self, params, unet):
        """The negative conditioning Forge did not make at CFG scale 1, encoded once a generation iteration."""
        iteration = int(getattr(self.p, "iteration", 0))
        if iteration not in self._negatives:
            self._negatives[iteration] = forge.negative_conditioning(self.p, params, unet)
        return self._negatives[iteration]

    def _flow_limits(self) -> None:
        """On a rectified-flow model (Forge Neo's Flux, Anima, Qwen-Image ...) the WebUI maps no prompt positions to
        words: a prompt strategy becomes the best measured schedule, which needs none, the explanation is left out,
        and the infotext says both."""
        if self.settings.changes_prompt:
            chosen = self.settings.strategy
            self.settings = replace(self.settings, strategy=DEFAULT_WITHOUT_PROMPT)
            self.flow_notes.append(f"mitigation {DEFAULT_WITHOUT_PROMPT} instead of {chosen}: on a rectified-flow "
                                   f"model the WebUI changes no prompt embedding ({forge.PROMPT_FAMILIES}); on the "
                                   "flow evaluation model the schedules left every copy, token removal none "
                                   "(BENCHMARKS.md)")
        if self.settings.explain:
            self.settings = replace(self.settings, explain=False)
            self.flow_notes.append(f"tokens not explained: on a rectified-flow model the WebUI maps no prompt position "
                                   f"to a word ({forge.PROMPT_FAMILIES})")

    def scoring_notes(self) -> List[str]:
        return [FORGE_CFG1_NOTE] * self.cfg1_scored + self.flow_notes

    def _family(self, denoiser) -> str:
        return "forge"  # every Forge sampler calls the model in k-diffusion form (DDIM's timesteps become sigmas)

    def _after_post_cfg(self, args: dict, pending: Pending) -> None:
        cfg_one = math.isclose(float(self.p.cfg_scale), 1.0)
        own, self._own_uncond = self._own_uncond, None
        skipped = (cfg_one or any(k in self.p.extra_generation_params for k in SKIPPED_UNCOND_KEYS)) \
            and uncond_is_missing(args["uncond_denoised"])  # Forge hands over zeros for a skipped pass
        if skipped and own is not None:
            self._record(pending, forge.guided_difference({**args, "uncond_denoised": own}))
            self.cfg1_scored = True
        elif skipped:
            self._skip(pending, FORGE_CFG1_REASON if cfg_one else self._skipped_keys_reason(pending))
        else:
            self._record(pending, forge.guided_difference(args))
        self.resolve_calibration()  # the UNet this sampling loaded, LoRA patches applied

    def _noise_level(self, pending: Pending, t: float) -> float:
        """Forge calls every model in sigma form, a rectified flow's too (memoguard reads it as x = x0 + sigma v)."""
        return t

    @contextmanager
    def _gradient_inputs(self, params, pending: Pending, reencode: bool = False):
        unet = forge.forge_unet(params.denoiser)
        forge.check_supported(unet.model)  # before touching the weights
        negative = self._negative(params, unet) if params.text_uncond is None else None  # CFG scale 1
        with differentiable(unet.model), frozen_parameters(unet.model):  # Forge samples under inference mode
            cond, uncond, x = forge.prompt_encodings(self.p, params, pending.layout, pending.iteration, ordinary,
                                                     negative)
            model = forge.ForgeModel(unet.model)
            prompt_text = lambda: forge.forge_prompt_text(self.p, params.denoiser, unet, ordinary)
            yield model, self._reencodable(model, cond, prompt_text, reencode), uncond, x, ordinary(params.sigma[0])
