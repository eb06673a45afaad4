"""Batched jobs that lose nothing: each finished batch appended to a JSONL file at once, --resume from what is
there, one progress line, and one line saying what was kept when a batch fails, the run is interrupted or a
launcher stops it."""
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ...errors import MemoGuardError
from .inputs import PromptFileError


def read_done(path: Path, rows):
    """The results an earlier run appended to `path`, checked against the prompt file. A last line cut off
    mid-write (the run died) is dropped, and the file cut back to the lines before it."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done, kept = [], 0
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            index, prompt = record["index"], record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if n == len(lines) and not line.endswith("\n"):
                print(f"note: {path}:{n} was cut off mid-write; it is scanned again", file=sys.stderr)
                break
            raise PromptFileError(f"{path}:{n} is not a MemoGuard scan result ({e}); move the file away or fix "
                                  "that line, then --resume again") from None
        if not (isinstance(index, int) and 0 <= index < len(rows)) or rows[index][0] != prompt:
            raise PromptFileError(f"{path}:{n} holds prompt {index} {prompt!r}, which is not in this prompt file "
                                  "at that place: resume with the prompt file it was written for")
        done.append(record)
        kept += len(line.encode("utf-8"))
    if kept != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(kept)
    return done


def results_so_far(out: Optional[Path], rows, resume: bool) -> list:
    """What an earlier run left in the JSONL `out` (with --resume); without it an existing file is not overwritten."""
    if out is None or not out.is_file():
        return []
    if resume:
        return read_done(out, rows)
    if out.stat().st_size:
        raise PromptFileError(f"{out} exists: pass --resume to go on with it, or another --out")
    return []


def append_jsonl(path: Path, records) -> None:
    """A finished batch goes to disk at once: it is never lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in records))


class Progress:
    """One stderr line: prompts done of all, rate and time left (shown by one process of several)."""

    def __init__(self, total: int, done: int, show: bool = True):
        self.total, self.done, self.start_done, self.t0, self.show = total, done, done, time.time(), show

    def update(self, n: int) -> None:
        self.done += n
        if not self.show:
            return
        elapsed = time.time() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else float("nan")
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"\r[{self.done}/{self.total}] {rate:.2f} prompts/s, {_fmt_time(left)} left   ", end="",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def _fmt_time(seconds: float) -> str:
    return "?" if not math.isfinite(seconds) else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def keep_batches(batches, path: Optional[Path], progress: Progress, todo: int, command: str, scope: str):
    """(records, None), each batch appended to `path` as it finishes; when a batch fails, the run is interrupted
    or a launcher's SIGTERM comes (it stops the others when one process fails): one line saying how many
    prompts were finished and where they are, and the exit code instead of None."""
    records = []
    on_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if on_main_thread else None
    try:
        for batch in batches:
            if path is not None:
                append_jsonl(path, batch)
            records += batch
            progress.update(len(batch))
    except (Exception, KeyboardInterrupt) as e:
        progress.close()
        kept = (f"the finished ones are in {path}: run the same command with --resume to go on" if path is not None
                else "nothing was kept (--out F.jsonl keeps each batch as it finishes)")
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else failure_reason(e)
        print(f"{command}: stopped after {len(records)} of the {todo} prompts {scope} had to do ({reason}); {kept}",
              file=sys.stderr)
        if isinstance(e, KeyboardInterrupt):
            return records, 130
        if isinstance(e, (MemoGuardError, RuntimeError)):
            return records, 2
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    progress.close()
    return records, None


class Terminated(MemoGuardError):
    pass


def _stop_on_sigterm(signum, frame):
    raise Terminated("terminated: a launcher stops every process when one fails, or the job was stopped")


def failure_reason(e: BaseException) -> str:
    from ...hosts import is_out_of_memory
    return f"out of memory: {e}" if is_out_of_memory(e) else str(e) or type(e).__name__


def _json_safe(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}

