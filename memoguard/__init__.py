"""MemoGuard: detect, explain and mitigate memorization in text-to-image diffusion models.

Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024.
Everything here is plain torch; diffusers/transformers are imported only by the standalone
path (memoguard.diffusers_model), so host adapters can import this package inside ComfyUI or
A1111 without pulling them in.
"""
from .calibration import Calibration, CalibrationError, roc_auc, tpr_at_fpr
from .errors import MemoGuardError
from .explain import TokenContributions, token_contributions
from .mitigate import MitigationRecord, minimize_embedding
from .model import DiffusionModel, PromptEncoding
from .score import (PARAMETERIZATIONS, ScoreTrace, ScoreUnavailable, eps_difference, l2_per_image,
                    rms_per_image, to_eps, uncond_is_missing)
from .train_filter import MemorizationFilter, TimestepReference, gaps_from_predictions
from .verdict import Verdict, verdict_for

from ._version import __version__  # noqa: F401  (one source: memoguard/_version.py)
