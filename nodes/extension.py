"""The list of MemoGuard nodes ComfyUI loads."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes_calibration import MemoGuardCalibrate
from .nodes_evidence import MemoGuardCopyEvidence
from .nodes_loader import MemoGuardTinyModelLoader
from .nodes_mitigation import EmbeddingMinimization
from .nodes_monitor import MemorizationMonitor, MemorizationScore
from .nodes_text_encode import MemoGuardTextEncode
from .nodes_tokens import TokenContributionsNode
from .nodes_training_filter import MemoGuardTrainingFilter, MemoGuardTrainingFilterReport


class MemoGuardExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [MemorizationMonitor, MemorizationScore, EmbeddingMinimization, TokenContributionsNode,
                MemoGuardTinyModelLoader, MemoGuardCalibrate, MemoGuardTextEncode, MemoGuardCopyEvidence,
                MemoGuardTrainingFilter, MemoGuardTrainingFilterReport]


async def comfy_entrypoint() -> MemoGuardExtension:
    return MemoGuardExtension()
