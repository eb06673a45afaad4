"""A job split over several processes (`accelerate launch -m memoguard scan ...`): each process appends to its own
shard F.jsonl.partK; the shards of any earlier run are merged back in input order."""
import glob
import json
import os
from pathlib import Path

from ...errors import MemoGuardError
from .jobs import read_done, results_so_far


def distributed_state(device: str):
    """accelerate's PartialState when launched on several processes (`accelerate launch -m memoguard scan`),
    else None; accelerate is needed only then. On the CPU the processes talk through gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    try:
        from accelerate import PartialState
    except ImportError:
        raise MemoGuardError("launched on several processes, but accelerate is not installed "
                             "(pip install accelerate)") from None
    state = PartialState(cpu=device == "cpu")
    if state.num_processes != world:  # each would scan everything into the same file
        raise MemoGuardError(f"launched as {world} processes, but accelerate set up {state.num_processes} "
                             f"({state.distributed_type}); launch with `accelerate launch --multi_gpu "
                             f"--num_processes {world}`")
    return state


def shards(out: Path) -> list:
    """The per-process shards F.jsonl.partK next to `out`, whatever number of processes wrote them."""
    return sorted(p for p in out.parent.glob(glob.escape(out.name) + ".part*") if p.name[len(out.name) + 5:].isdigit())


def resumed(out: Path, rows, resume: bool) -> list:
    """What an earlier run finished: `out`, with the shards of a run on several processes merged into it."""
    if resume and shards(out):
        merge_shards(out, rows)
    return results_so_far(out, rows, resume)


def merge_shards(out: Path, rows):
    """Every shard and what `out` held, as one file in the input order; the shards are removed."""
    records = {}
    for path in [out] + shards(out):
        if path.is_file():
            records.update({r["index"]: r for r in read_done(path, rows)})
    merged = out.with_name(out.name + ".merging")
    merged.write_text("".join(json.dumps(records[i], allow_nan=False) + "\n" for i in sorted(records)),
                      encoding="utf-8")
    merged.replace(out)  # atomic: the finished results are in one file or the other, never lost
    for path in shards(out):
        path.unlink()
    return [dict(records[i]) for i in sorted(records)]

