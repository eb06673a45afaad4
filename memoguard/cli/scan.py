"""`python -m memoguard scan`: first-step scores for one prompt or a prompt file of any length.

Input: --prompt TEXT, or --file F as .txt (one prompt a line), .csv (a `prompt` column and an
optional `label` column) or .jsonl ({"prompt": ..., "label": ...}). Labels are 1/0 or
true/false (1 = memorized). Prompts go through in batches of --batch-size, explanation included.
Output: a table on stdout, and --out F.csv / F.json, or F.jsonl: one line per prompt appended as
each batch finishes (--resume skips the prompts already there), with an HTML report F.html beside it.
"""
import sys
from pathlib import Path

from ..calibration import CalibrationError, roc_auc, tpr_at_fpr
from ..errors import MemoGuardError
from ..model import TOKENS_PER_CHUNK
from ..calibration_lookup import run_detector
from ..score import DEFAULT_DETECTOR, DETECTORS, explained_detector
from ..standalone.pipeline import DEFAULT_STEPS
from .lib.inputs import DTYPES, PromptFileError, check_dtype, load_calibration, read_prompts
from .lib.jobs import Progress, keep_batches, results_so_far
from .lib.reporting import as_float, html_report, score_text, write_results
from .lib.sharding import distributed_state, merge_shards, resumed, shards


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
    p.add_argument("--detector", choices=DETECTORS, default=None,
                   help=f"first-step score (default: the calibration's, else {DEFAULT_DETECTOR}): detail_magnitude "
                        f"(the magnitude of the difference's detail), magnitude (Wen et al.), anisotropy (Asthana & "
                        f"Belagiannis: also the alignment at a low noise level, 2 conditional evaluations a prompt), "
                        f"magnitude_alignment; a calibration serves only scores of its own detector")
    p.add_argument("--explain", type=int, default=3, metavar="K", help="show the top K tokens (0: skip, faster)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results to .csv or .json, or append them to .jsonl batch by batch (+ an HTML report)")
    p.add_argument("--resume", action="store_true", help="with --out F.jsonl: skip the prompts F already holds")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp16/bf16 on a GPU; fp32 on the CPU")


def scan_batches(model, rows, calibration, fpr=0.01, seeds=1, steps=DEFAULT_STEPS, explain=3, batch_size=16,
                 skip=frozenset(), detector=None):
    """Results batch by batch (a list of dicts per batch) for the rows whose index is not in `skip`. detector:
    the first-step score (default: the calibration's, else memoguard.score.DEFAULT_DETECTOR)."""
    from ..explain import token_contributions
    from ..measure import FirstStep
    if batch_size < 1:
        raise MemoGuardError(f"--batch-size must be >= 1, got {batch_size}")
    todo = [(i, prompt, label) for i, (prompt, label) in enumerate(rows) if i not in skip]
    threshold = calibration.threshold(fpr) if calibration else float("nan")
    detector = detector or run_detector(calibration)
    uncond = model.encode([""])
    first = FirstStep(model, uncond, range(seeds), model.latent_shape(), model.timesteps(steps)[0], detector)

    def measured(rows, cond):
        """(score, prompt tokens, contributions or None) of each prompt of `cond`."""
        scores, counts = first.gaps(cond).mean(1).tolist(), cond.prompt_mask.sum(1).tolist()
        worded = [k for k, n in enumerate(counts) if n]
        found = {}
        if explain and worded:
            x = first.x.repeat(len(worded), 1, 1, 1)
            found = dict(zip(worded, token_contributions(model, cond.rows(worded), uncond, x, total_steps=steps,
                                                         detector=explained_detector(detector))))
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
                # where leave-one-out shows that no single word ends the recall, the explanation says so
                "explanation": None if contrib is None else contrib.summary(
                    threshold if calibration and score >= threshold else None, explain),
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


def run(args) -> int:
    from ..errors import ModelLoadError
    from ..standalone.diffusers_model import load_model
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
        calibration, notes = load_calibration(args.calibration, model, args.steps, args.detector, sampler_run=False)
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
                           skip=set(range(len(rows))) - set(todo), detector=args.detector)
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
        print(f"{flag} {score_text(as_float(r['score']))} p{score_text(as_float(r['percentile']))[:5]:>6}  {r['prompt'][:70]!s:70}  {top}")
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


