import sys
from pathlib import Path

# The node pack's `nodes` package lives at the repository root, next to `memoguard`.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

# The tiny models here are faster on one thread than on cores shared with other jobs.
torch.set_num_threads(1)
