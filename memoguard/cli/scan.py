"""`python -m memoguard scan`: first-step scores for one prompt or a prompt file of any length.

Input: --prompt TEXT, or --file F as .txt (one prompt a line), .csv (a `prompt` column and an
optional `label` column) or .jsonl ({"prompt": ..., "label": ...}). Labels are 1/0 or
true/false (1 = memorized). Prompts go through in batches of --batch-size, explanation included.
Output: a table on stdout, and --out F.csv / F.json, or F.jsonl: one line per prompt appended as
each batch finishes (--resume skips the prompts already there), with an HTML report F.html beside it.
"""
import csv
import glob
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch


from ..calibration import CalibrationError, default_store_folder, roc_auc, tpr_at_fpr
from ..calibration_lookup import CalibrationLookup
from ..errors import MemoGuardError
from ..model import TOKENS_PER_CHUNK
from ..standalone.pipeline import DEFAULT_STEPS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TRUE, _FALSE = {"1", "true", "yes", "memorized"}, {"0", "false", "no", ""}


class PromptFileError(MemoGuardError, ValueError):
    pass


def _label(value, where: str):
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0 if text else None
    raise PromptFileError(f"{where}: label {value!r} is not 1/0/true/false")


def read_prompts(path: Path):
    """[(prompt, label or None)] from a txt, CSV or JSONL file, with clear errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e}") from None
    suffix = Path(path).suffix.lower()
    rows = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}: a CSV needs a 'prompt' column (has: {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            rows.append((row["prompt"] or "", _label(row.get("label", ""), f"{path}:{i}")))
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{i}: not JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise PromptFileError(f"{path}:{i}: each line needs a string field 'prompt'")
            rows.append((obj["prompt"], _label(obj.get("label", ""), f"{path}:{i}")))
    else:
        rows = [(line.strip(), None) for line in text.splitlines() if line.strip()]
    if not rows:
        raise PromptFileError(f"{path}: no prompts found")
    return rows


def load_calibration(path, model, steps: int):
    """The model's calibration (the file `path`, else the default store or the bundled preset) at the noise level
    of the first step of a `steps` schedule, and notes on how this run differs from it; (None, []) if none was
    made for this model. A file that is refused or broken raises CalibrationError (the CLI stops with it)."""
    how_to = f"run `memoguard calibrate --model ...` on it ({model.name})"
    if path is not None:
        path = Path(path)
        lookup = CalibrationLookup("file", path.name, [path.parent], how_to)
    else:
        lookup = CalibrationLookup("auto", "", [default_store_folder()], how_to)
    found = lookup.resolve(model.model_key)
    if found.calibration is None:
        if found.absent:
            return None, []
        raise CalibrationError(found.problem)
    level = model.noise_level(model.timesteps(steps)[0])
    calibration = found.calibration.at_noise_level(level)
    return calibration, calibration.check(model.parameterization, level, model.latent_shape(), window=1)


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", type=Path, help="prompts as .txt, .csv (prompt[,label]) or .jsonl")
    p.add_argument("--model", type=Path, default=None, help="diffusers folder or .safetensors/.ckpt (default: bundled tiny model)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto",
                   help="a checkpoint file's prediction type; auto: see memoguard.standalone.checkpoints (default auto)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration JSON (default: the model's own in the calibration folder, or the bundled preset)")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate that sets the threshold (default 0.01)")
    p.add_argument("--seeds", type=int, default=1, help="generations per prompt (scores are averaged)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="schedule whose first timestep is scored")
    p.add_argument("--explain", type=int, default=3, metavar="K", help="show the top K tokens (0: skip, faster)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results to .csv or .json, or append them to .jsonl batch by batch (+ an HTML report)")
    p.add_argument("--resume", action="store_true", help="with --out F.jsonl: skip the prompts F already holds")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp16/bf16 on a GPU; fp32 on the CPU")


def scan_batches(model, rows, calibration, fpr=0.01, seeds=1, steps=DEFAULT_STEPS, explain=3, batch_size=16,
                 skip=frozenset()):
    """Results batch by batch (a list of dicts per batch) for the rows whose index is not in `skip`."""
    from ..explain import token_contributions
    from ..measure import FirstStep
    if batch_size < 1:
        raise MemoGuardError(f"--batch-size must be >= 1, got {batch_size}")
    todo = [(i, prompt, label) for i, (prompt, label) in enumerate(rows) if i not in skip]
    threshold = calibration.threshold(fpr) if calibration else float("nan")
    uncond = model.encode([""])
    first = FirstStep(model, uncond, range(seeds), model.latent_shape(), model.timesteps(steps)[0])

    def measured(rows, cond):
        """(score, prompt tokens, contributions or None) of each prompt of `cond`."""
        scores, counts = first.gaps(cond).mean(1).tolist(), cond.prompt_mask.sum(1).tolist()
        worded = [k for k, n in enumerate(counts) if n]
        found = {}
        if explain and worded:
            x = first.x.repeat(len(worded), 1, 1, 1)
            found = dict(zip(worded, token_contributions(model, cond.rows(worded), uncond, x, total_steps=steps)))
        return [(score, int(n), found.get(k)) for k, (score, n) in enumerate(zip(scores, counts))]

    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        out = []
        for (index, prompt, label), (score, tokens, contrib) in zip(
                batch, model.per_prompt([prompt for _, prompt, _ in batch], measured)):
            out.append({
                "index": index, "prompt": prompt, "label": label, "score": score, "tokens": tokens,
                "percentile": calibration.percentile(score) if calibration else float("nan"),
                "flagged": bool(calibration) and bool(score >= threshold), "threshold": threshold,
                "top_tokens": [] if contrib is None else [(t, round(v, 4)) for t, v in contrib.top(explain)],
                "explanation_method": None if contrib is None else contrib.method_name,
            })
        yield out


def summarize(results, calibration, fpr):
    threshold = calibration.threshold(fpr) if calibration else float("nan")
    summary = {"n": len(results), "threshold": threshold, "fpr": fpr,
               "calibration": calibration.model_key if calibration else None}
    labelled = [r for r in results if r["label"] is not None]
    pos = [r["score"] for r in labelled if r["label"] == 1]
    neg = [r["score"] for r in labelled if r["label"] == 0]
    if pos and neg:
        summary.update(auc=roc_auc(pos, neg), tpr_at_1pct_fpr=tpr_at_fpr(pos, neg, 0.01), positives=len(pos),
                       negatives=len(neg))
    return summary


def scan(model, rows, calibration, fpr=0.01, seeds=1, steps=DEFAULT_STEPS, explain=3, batch_size=16):
    results = [r for batch in scan_batches(model, rows, calibration, fpr, seeds, steps, explain, batch_size)
               for r in batch]
    return results, summarize(results, calibration, fpr)


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


def check_dtype(device: str, dtype: str) -> None:
    if device == "cpu" and dtype != "fp32":
        raise MemoGuardError(f"--dtype {dtype} needs a GPU (--device cuda); on the CPU use fp32")


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


def _fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4f}"


def run(args) -> int:
    from ..standalone.diffusers_model import ModelLoadError, load_model
    jsonl = args.out is not None and args.out.suffix.lower() in (".jsonl", ".ndjson")
    if args.resume and not jsonl:
        raise MemoGuardError("--resume needs --out F.jsonl")
    check_dtype(args.device, args.dtype)
    state = distributed_state(args.device)
    if state is not None and not jsonl:
        raise MemoGuardError("several processes need --out F.jsonl (each writes its shard, the first merges them)")
    device = str(state.device) if state is not None and args.device == "cuda" else args.device  # one GPU each
    main_process = state is None or state.is_main_process
    try:
        rows = [(args.prompt, None)] if args.prompt is not None else read_prompts(args.file)
        if jsonl:
            left = shards(args.out)
            if left and not args.resume:
                raise PromptFileError(f"{left[0]} is left from an earlier run on several processes: pass --resume "
                                      f"to go on with it, or another --out")
            if state is None:
                done = resumed(args.out, rows, args.resume)
            else:
                with state.main_process_first():  # the first process merges what is left; the others then read it
                    done = (resumed if main_process else results_so_far)(args.out, rows, args.resume)
        else:
            done = []
        model = load_model(args.model, device=device, dtype=DTYPES[args.dtype], prediction=args.prediction)
        calibration, notes = load_calibration(args.calibration, model, args.steps)
    except (PromptFileError, CalibrationError, ModelLoadError) as e:
        print(f"memoguard scan: {e}", file=sys.stderr)
        return 2
    for note in notes if main_process else ():
        print(f"note: {note}", file=sys.stderr)
    empty = [i for i, (prompt, _) in enumerate(rows) if not prompt.strip()]
    if empty and main_process:
        which = "" if len(rows) == 1 else f" ({len(empty)} in {args.file}, the first #{empty[0]})"
        print(f"note: the empty prompt{which} is the unconditional prompt itself: its score is 0 by definition",
              file=sys.stderr)
    if calibration is None and main_process:
        print(f"note: no calibration for {model.name} (key {model.model_key}): scores only, uncalibrated "
              f"(run `memoguard calibrate --model ...` first)", file=sys.stderr)
    if done and main_process:
        print(f"resuming: {len(done)} of {len(rows)} prompts are in {args.out}", file=sys.stderr)
    todo = [i for i in range(len(rows)) if i not in {r["index"] for r in done}]
    shard, who = args.out, ""
    if state is not None:  # this process takes its share of what is left; its lines go to its own shard
        with state.split_between_processes(todo) as mine:
            todo = list(mine)
        shard = args.out.with_name(f"{args.out.name}.part{state.process_index}")
        who = f" (process {state.process_index} of {state.num_processes})"
        if main_process:
            print(f"{state.num_processes} processes share the {len(rows) - len(done)} prompts left; each appends to "
                  f"its own {args.out.name}.partK", file=sys.stderr)
    results = list(done)
    share = state is not None
    progress = Progress(len(todo), 0, show=main_process) if share else Progress(len(rows), len(rows) - len(todo))
    batches = scan_batches(model, rows, calibration, args.fpr, args.seeds, args.steps, args.explain, args.batch_size,
                           skip=set(range(len(rows))) - set(todo))
    new, code = keep_batches(batches, shard if jsonl else None, progress, len(todo),
                             f"memoguard scan{who}", "this process" if share else "this run")
    if code is not None:
        return code
    results += new
    if state is not None:
        state.wait_for_everyone()
        if not main_process:
            return 0
    if jsonl:  # the shards, or the prompts a resumed run added after merged ones, back in the input order
        results = merge_shards(args.out, rows)
    long = [r for r in results if r.get("tokens", 0) > TOKENS_PER_CHUNK]
    if long:
        print(f"note: {len(long)} prompt(s) are longer than the text encoder's {TOKENS_PER_CHUNK} tokens (first: "
              f"#{long[0]['index']}, {long[0]['tokens']} tokens): scored in chunks of {TOKENS_PER_CHUNK}, as A1111 "
              f"and ComfyUI encode them (a plain diffusers pipeline cuts them at {TOKENS_PER_CHUNK})", file=sys.stderr)
    results.sort(key=lambda r: r["index"])
    summary = summarize(results, calibration, args.fpr)
    methods = sorted({r["explanation_method"] for r in results if r["explanation_method"]})
    if methods:
        print(f"top tokens by {', '.join(methods)}", file=sys.stderr)
    for r in results:
        flag = "FLAG" if r["flagged"] else "ok  " if calibration else "unc."
        top = ", ".join(f"{t} {100 * s:.0f}%" for t, s in r["top_tokens"])
        print(f"{flag} {_fmt(_num(r['score']))} p{_fmt(_num(r['percentile']))[:5]:>6}  {r['prompt'][:70]!s:70}  {top}")
    if "auc" in summary:
        print(f"AUC {summary['auc']:.3f}  TPR@1%FPR {summary['tpr_at_1pct_fpr']:.3f}  "
              f"({summary['positives']} positives, {summary['negatives']} negatives)")
    if jsonl:
        report = args.out.with_suffix(".html")
        report.write_text(html_report(results, summary, calibration, model.name))
        print(f"wrote {args.out} and {report}", file=sys.stderr)
    elif args.out:
        write_results(args.out, results, summary)
    return 0


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
    from ..hosts import is_out_of_memory
    return f"out of memory: {e}" if is_out_of_memory(e) else str(e) or type(e).__name__


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _json_safe(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def html_report(results, summary, calibration, model_name: str, top: int = 20) -> str:
    """Score histogram against the calibration's benign scores, ROC when labelled, the top flagged prompts."""
    import base64
    import html
    from .. import report
    image = lambda img: f"<img src='data:image/png;base64,{base64.b64encode(report.to_png(img)).decode()}'>"
    scores = [_num(r["score"]) for r in results]
    groups = {"scanned prompts": scores}
    if calibration is not None:
        groups["benign (calibration)"] = calibration.scores
    threshold = summary["threshold"] if math.isfinite(summary["threshold"]) else None
    parts = [f"<p>{len(results)} prompts on {html.escape(model_name)}; "
             f"{'threshold %.4f at %.1f%% false positives' % (threshold, 100 * summary['fpr']) if threshold else 'no calibration: scores only'}.</p>",
             image(report.histogram_plot(groups, threshold, title="first-step score"))]
    if "auc" in summary:
        pos = [_num(r["score"]) for r in results if r["label"] == 1]
        neg = [_num(r["score"]) for r in results if r["label"] == 0]
        parts += [f"<p>AUC {summary['auc']:.3f}, TPR at 1% FPR {summary['tpr_at_1pct_fpr']:.3f} "
                  f"({len(pos)} memorized, {len(neg)} not)</p>", image(report.roc_plot(pos, neg, title="ROC"))]
    ranked = sorted(results, key=lambda r: -_num(r["score"]))[:top]
    rows = "".join(f"<tr><td>{r['index']}</td><td>{_num(r['score']):.4f}</td>"
                   f"<td class='{'flag' if r['flagged'] else 'ok'}'>{'flagged' if r['flagged'] else ''}</td>"
                   f"<td>{html.escape(r['prompt'])}</td><td>{report.tokens_html([t for t, _ in r['top_tokens']], [s for _, s in r['top_tokens']])}</td></tr>"
                   for r in ranked)
    parts.append(f"<h2>Highest scores</h2><table><tr><th>#</th><th>score</th><th></th><th>prompt</th>"
                 f"<th>top tokens</th></tr>{rows}</table>")
    return report.html_page("MemoGuard scan", parts)


def write_results(path: Path, results, summary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"summary": summary, "results": results}, indent=1))
        return
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label", "score", "percentile", "flagged", "top_tokens"])
        for r in results:
            w.writerow([r["prompt"], "" if r["label"] is None else r["label"], f"{r['score']:.6f}",
                        f"{r['percentile']:.2f}", int(r["flagged"]), " ".join(f"{t}:{s}" for t, s in r["top_tokens"])])
