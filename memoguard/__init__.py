"""MemoGuard: detect, explain and mitigate memorization in text-to-image diffusion models.

Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024.
Layout (imports go one way: cli -> standalone -> the method; host adapters -> the method + hosts):
  - this package's top level: the method (score, calibration, verdict, explain, mitigate, train_filter,
    sampling, measure), the adapter interface (model) and the host contract (hosts); plain torch only;
  - memoguard.standalone: diffusers models and single-file checkpoints, batched jobs (needs diffusers);
  - memoguard.cli: one module per `python -m memoguard` command;
  - memoguard.tiny: the bundled memorizing model's data, trainer and judge.
"""
from .calibration import Calibration, CalibrationError, roc_auc, tpr_at_fpr
from .errors import MemoGuardError
from .explain import TokenContributions, token_contributions
from .mitigate import MitigationRecord, minimize_embedding
from .model import DiffusionModel, PromptEncoding
from .score import (DEFAULT_DETECTOR, PARAMETERIZATIONS, ScoreTrace, ScoreUnavailable, eps_difference,
                    l2_per_image, rms_per_image, step_score, to_eps, uncond_is_missing)
from .train_filter import MemorizationFilter, TimestepReference, gaps_from_predictions
from .verdict import Verdict, verdict_for

from ._version import __version__  # noqa: F401  (one source: memoguard/_version.py)
