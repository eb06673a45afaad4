"""`python -m memoguard bench --json FILE [--quick] [--model DIR]`: every claim, measured on an evaluation model.

Evaluation models: the bundled one (default) and the second, trained by memoguard.tiny.train_outdoor;
each is measured against its own training set (memoguard.tiny.evalsets), any other model against the
bundled one's.

Protocol (Wen et al.): each evaluation prompt is sampled with G seeds; a prompt is a positive
when at least half of its generations copy a training image (judge.py), whatever its kind.
Scores come from those same generations' guided DDIM runs: first step, one generation
(steps1_gen1); first step averaged over 4 generations (steps1_gen4); first 10 steps x 4
generations (steps10_gen4). AUC and TPR@1%FPR are given pooled and per negative kind.
"""
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..calibration import roc_auc, threshold_at_fpr, tpr_at_fpr
from ..explain import METHODS, token_contributions
from ..mitigate import extra_cost, mitigate
from ..score import DEFAULT_DETECTOR, DETECTORS, STEP_DETECTORS
from ..standalone.pipeline import generate
from ..sampling import initial_noise, sample
from ..tiny.evalsets import eval_set_for
from ..tiny.prompts import KINDS

MITIGATION_STEPS = 20
DEFAULT_MITIGATION = "mask_padding"  # the table row of the default strategy at its default target
HOST_MITIGATION = "opposite_guidance_0.2_s3"  # the same for hosts that know neither the prompt's tokens nor its text
SEEDS = (0, 1, 2, 3)
CALIBRATION_FPR_PROMPTS, CALIBRATION_SPLITS = 600, 200  # benign prompts and random halvings of the held-out FPR


def add_arguments(p):
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="fewer prompts and a 20-step schedule (< 2 min on 2 cores)")
    p.add_argument("--model", type=Path, default=None, help="diffusers folder or .safetensors/.ckpt (default: the bundled model)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto",
                   help="a checkpoint file's prediction type; auto: see memoguard.standalone.checkpoints (default auto)")
    p.add_argument("--target", type=float, default=None,
                   help="mitigation target (RMS gap); default: the median first-step score of the negatives")
    p.add_argument("--detection-only", action="store_true",
                   help="label the prompts and compare the first-step detectors, nothing else")


def detection_metrics(scores: np.ndarray, positive: np.ndarray, kinds: np.ndarray) -> dict:
    pos = scores[positive]
    out = {"auc": roc_auc(pos, scores[~positive]), "tpr_at_1pct_fpr": tpr_at_fpr(pos, scores[~positive], 0.01),
           "per_negative_kind": {}}
    for kind in KINDS:
        neg = scores[(kinds == kind) & ~positive]
        if len(neg):
            out["per_negative_kind"][kind] = {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
                                              "n": int(len(neg))}
    return out


def remove_tokens(model, prompt: str, positions) -> str:
    """The prompt's text without the tokens at embedding positions `positions` (first chunk).

    Re-encoding is the sound removal for a causal text encoder: setting one position to the empty
    prompt's output would leave the token in every later position."""
    tok = model.tokenizers[0]
    ids = tok(prompt, add_special_tokens=False).input_ids
    for position in sorted(positions, reverse=True):
        chunk, slot = divmod(position, 77)
        del ids[chunk * 75 + slot - 1]
    return tok.decode(ids)


def run_bench(model, quick: bool, target=None, log=print, detection_only: bool = False) -> dict:
    t_start = time.time()
    evalset = eval_set_for(model)
    prompts = evalset.prompts(per_kind=20 if quick else 100)
    label_steps = 20 if quick else 50
    texts = [p.text for p in prompts]
    kinds = np.array([p.kind for p in prompts])
    log(f"labelling {len(texts)} prompts x {len(SEEDS)} seeds, DDIM {label_steps} steps ...")
    images, gaps = generate(model, texts, SEEDS, steps=label_steps)
    copies = evalset.is_copy(images.reshape(-1, *images.shape[2:])).reshape(len(texts), len(SEEDS))
    positive = copies.mean(1) >= 0.5
    res = {"model": getattr(model, "name", "model"), "evaluation_set": evalset.name, "quick": quick,
           "label_steps": label_steps, "copy_ratio": evalset.copy_ratio, "guidance": model.guidance, "seeds": list(SEEDS),
           "labels": {k: {"prompts": int((kinds == k).sum()), "positives": int(positive[kinds == k].sum())}
                      for k in KINDS}}
    scores = {"steps1_gen1": gaps[:, 0, 0], "steps1_gen4": gaps[:, :, 0].mean(1),
              "steps10_gen4": gaps[:, :, :10].mean((1, 2))}
    res["detection"] = {k: detection_metrics(v, positive, kinds) for k, v in scores.items()}
    res["prompts"] = [{"text": t, "kind": k, "copy_rate": float(c), "positive": bool(p), "steps1_gen1": float(s)}
                      for t, k, c, p, s in zip(texts, kinds, copies.mean(1), positive, scores["steps1_gen1"])]
    # the same scores with labels by intent: duplicated captions against every other kind
    res["detection_by_intent"] = {k: detection_metrics(v, kinds == "memorized", kinds) for k, v in scores.items()}
    res["detectors"] = detector_bench(model, texts, positive, kinds, label_steps)
    log(f"positives {int(positive.sum())}/{len(texts)}; steps1_gen1 AUC {res['detection']['steps1_gen1']['auc']:.3f}")
    for detector in DETECTORS:
        got = res["detectors"][detector]["by_outcome"]["steps1_gen1"]
        log(f"detector {detector}: AUC {got['auc']:.3f}, TPR@1%FPR {got['tpr_at_1pct_fpr']:.3f}, "
            f"{res['detectors'][detector]['cost_ratio']:.2f}x the magnitude's time")
    res["calibration_fpr"] = {detector: calibration_fpr_bench(model, evalset.benign_prompts(CALIBRATION_FPR_PROMPTS),
                                                              label_steps, detector=detector)
                              for detector in STEP_DETECTORS}
    for detector, found in res["calibration_fpr"].items():
        for name, row in found["variants"].items():
            log(f"calibration {detector} {name}: held-out FPR {row['fpr_at_1pct']:.3f} at nominal 0.01, "
                f"{row['fpr_at_5pct']:.3f} at 0.05")
    if detection_only:
        res["seconds"] = round(time.time() - t_start, 1)
        return res

    res["explanation"] = explanation_tables(model, texts, kinds, positive, scores["steps1_gen4"], label_steps, quick)
    for name, e in res["explanation"]["memorized"].get("methods", {}).items():
        log(f"explanation {name}: top-1 removal ends the flag {e['top1_ends_flag']:.2f}, "
            f"deletion AUC {e['deletion_auc']:.3f}")

    res.update(mitigation_tables(model, evalset, prompts, positive, scores["steps1_gen1"], quick, target))
    m = res["mitigation"][DEFAULT_MITIGATION]
    log(f"mitigation ({DEFAULT_MITIGATION}): copy {m['copy_rate_before']:.2f} -> {m['copy_rate_after']:.2f}, "
        f"alignment {m['alignment_before']:.2f} -> {m['alignment_after']:.2f}, time ratio {m['time_ratio']:.2f}")
    res["band"] = band_bench(model, evalset.benign_prompts(), texts, positive, gaps, label_steps, quick)
    log(f"band: benign inside at every step {res['band']['same_schedule']['benign_inside_every_step']:.2f}, "
        f"positives above at step 1 {res['band']['same_schedule']['positive_above_step1']:.2f}")
    res["overhead"] = overhead_bench(model, texts[:16], repeats=3 if quick else 7)
    res["seconds"] = round(time.time() - t_start, 1)
    return res


def detector_bench(model, texts, positive: np.ndarray, kinds: np.ndarray, steps: int) -> dict:
    """The first-step detectors side by side on the same noise, under both labelings, with their cost."""
    from ..measure import first_step_gaps
    out = {}
    t_first = model.timesteps(steps)[0]
    for detector in DETECTORS:
        t0 = time.perf_counter()
        gaps = first_step_gaps(model, texts, SEEDS, model.latent_shape(), t_first, 128, detector=detector)
        seconds = time.perf_counter() - t0
        scores = {"steps1_gen1": gaps[:, 0], "steps1_gen4": gaps.mean(1)}
        out[detector] = {"seconds": seconds, "conditional_evaluations_per_prompt": 2 if detector == "anisotropy" else 1,
                         "by_outcome": {k: detection_metrics(v, positive, kinds) for k, v in scores.items()},
                         "by_intent": {k: detection_metrics(v, kinds == "memorized", kinds) for k, v in scores.items()}}
    for detector in DETECTORS:
        out[detector]["cost_ratio"] = out[detector]["seconds"] / out[DETECTORS[0]]["seconds"]
    return out


def calibration_fpr_bench(model, prompts, steps: int, seeds=(0, 1, 2, 3), detector: str = DEFAULT_DETECTOR,
                          splits: int = CALIBRATION_SPLITS) -> dict:
    """Does a calibration's 1 % mean 1 % for the images users make? Benign prompts of the model's kind, split at
    random into two halves, `splits` times: the calibration's threshold from one half, the share of the other half's
    single generations (every seed: a user's image is one generation) at or above it; mean and 10th / 90th
    percentile over the splits (one split alone swings with the few prompts at the top). Calibration variants:
    one seed a prompt, the mean over the seeds a prompt, and every prompt x seed a sample (what `calibrate` keeps)."""
    from ..measure import first_step_gaps
    gaps = first_step_gaps(model, prompts, list(seeds), model.latent_shape(), model.timesteps(steps)[0], 128,
                           detector=detector)
    rng, half = np.random.default_rng(0), len(prompts) // 2
    found = {}
    for _ in range(splits):
        order = rng.permutation(len(prompts))
        fit, held = gaps[order[:half]], gaps[order[half:]]
        for name, scores in (("one_seed", fit[:, 0]), ("seed_mean", fit.mean(1)), ("every_seed", fit.reshape(-1))):
            for fpr, key in ((0.01, "fpr_at_1pct"), (0.05, "fpr_at_5pct")):
                found.setdefault(name, {}).setdefault(key, []).append(float((held >= threshold_at_fpr(scores, fpr)).mean()))
    variants = {name: {key: float(np.mean(v)) for key, v in rows.items()} |
                {f"{key}_p10_p90": [float(np.percentile(v, 10)), float(np.percentile(v, 90))] for key, v in rows.items()}
                for name, rows in found.items()}
    return {"prompts": len(prompts), "seeds": list(seeds), "detector": detector, "splits": splits,
            "held_out_generations": (len(prompts) - half) * len(seeds), "variants": variants}


def band_shares(band, levels, lines: np.ndarray, positive: np.ndarray, first_steps: int = 3) -> dict:
    """How runs sit against a band placed by noise level: lines (prompts, generations, steps)."""
    high = np.array([np.nan if band.at(s) is None else band.at(s)[1] for s in levels])
    covered = np.isfinite(high)
    above = lines > high  # NaN (outside the band's range) compares False
    benign, pos = above[~positive][..., covered], above[positive]
    return {"steps_covered": int(covered.sum()), "steps": len(levels),
            "benign_inside_every_step": float((~benign.any(-1)).mean()) if benign.size else float("nan"),
            "benign_step_outside_rate": float(benign.mean()) if benign.size else float("nan"),
            "positive_above_step1": float(pos[..., 0].mean()) if pos.size else float("nan"),
            f"positive_above_in_first_{first_steps}": float(pos[..., :first_steps].any(-1).mean()) if pos.size
            else float("nan"),
            "benign_generations": int(benign.shape[0] * benign.shape[1]) if benign.size else 0,
            "positive_generations": int(pos.shape[0] * pos.shape[1]) if pos.size else 0}


def band_bench(model, benign_prompts, texts, positive: np.ndarray, gaps: np.ndarray, steps: int, quick: bool) -> dict:
    """Issue 9's band, measured: a benign band from calibration prompts (none of the bench's) at the model's
    guidance, placed under the bench's own runs by noise level; then under a run with half the steps (does
    one band serve another step count?) and at guidance 7.5 (does it serve another CFG scale?)."""
    from ..calibration import Band
    from ..measure import band_gaps
    shape = model.latent_shape()
    n_band = 16 if quick else 64
    t0 = time.perf_counter()
    band_runs = band_gaps(model, benign_prompts[:n_band], 1000, shape, steps, model.guidance)
    seconds = time.perf_counter() - t0
    levels = [model.noise_level(t) for t in model.timesteps(steps)]
    band = Band.from_runs(levels, band_runs, 0.01, {"steps": steps, "guidance": model.guidance})
    out = {"band_prompts": n_band, "fpr": 0.01, "seconds": round(seconds, 1),
           "same_schedule": band_shares(band, levels, gaps, positive)}
    subset = np.r_[np.nonzero(positive)[0], np.nonzero(~positive)[0][:: 2 if quick else 4]]
    sub_texts, sub_pos = [texts[i] for i in subset], positive[subset]
    for name, n, guidance in (("half_steps", steps // 2, None), ("guidance_7.5", steps, 7.5)):
        _, other = generate(model, sub_texts, SEEDS[:2], steps=n, guidance=guidance)
        other_levels = [model.noise_level(t) for t in model.timesteps(n)]
        out[name] = {"steps_run": n, "guidance_run": guidance or model.guidance,
                     **band_shares(band, other_levels, other, sub_pos)}
    out["band"] = band.to_dict()
    return out


FUNCTION_WORDS = {"a", "an", "the", "of", "on", "in", "at", "by", "and", ",", "."}


class EvaluationCounter:
    """Counts the images the model's network is run on (a UNet evaluation each) while active."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self):
        inner = self.model.raw_prediction

        def counted(x, *args, **kwargs):
            self.count += x.shape[0]
            return inner(x, *args, **kwargs)
        self.model.raw_prediction = counted
        return self

    def __exit__(self, *exc):
        del self.model.raw_prediction  # the class's method again


def explanation_bench(model, prompts, threshold: float, steps: int, methods=METHODS[1:]) -> dict:
    """Deletion test: words removed in each method's order (re-encoding the prompt), first-step score after
    each removal, mean of 4 seeds. Per ordering: the area under score / score before (mean over removals 1..n;
    lower = the order finds the words that carry the recall sooner), how often removing the top word alone
    ends the flag, how often its top word is exact leave-one-out's, the network evaluations per prompt and
    generation of one explained step, and the seconds per prompt. References: a random order, and the exact
    leave-one-out (each word removed alone by re-encoding; n + 1 first-step passes per prompt). A flagged prompt
    is "spread" when no single word's removal ends its flag."""
    from ..standalone.pipeline import first_step_scores
    if not prompts:
        return {"n": 0}
    uncond = model.encode([""])
    rng = np.random.default_rng(0)
    orders = {m: [] for m in (*methods, "random", "exact_leave_one_out")}
    seconds = {m: 0.0 for m in methods}
    evaluations = {m: 0 for m in methods}
    tokens, groups = [], []
    for text in prompts:
        cond = model.encode([text])
        x = initial_noise(model, model.latent_shape(), SEEDS, model.device)
        for method in methods:
            t0 = time.perf_counter()
            with EvaluationCounter(model) as counter:
                contrib = token_contributions(model, cond, uncond, x, steps=1, total_steps=steps, method=method)[0]
            seconds[method] += time.perf_counter() - t0
            evaluations[method] += counter.count
            orders[method].append(contrib.ranking())
        tokens.append(contrib.tokens), groups.append(contrib.groups)
        orders["random"].append([int(i) for i in rng.permutation(len(contrib.tokens))])
    single = [[remove_tokens(model, t, g) for g in row] for t, row in zip(prompts, groups)]
    flat = first_step_scores(model, [s for row in single for s in row] + list(prompts), SEEDS, steps).mean(1)
    base = flat[-len(prompts):]
    cut = np.cumsum([0] + [len(row) for row in single])
    best_single = np.array([flat[a:b].min() for a, b in zip(cut, cut[1:])])
    orders["exact_leave_one_out"] = [[int(i) for i in np.argsort(flat[a:b], kind="stable")] for a, b in zip(cut, cut[1:])]
    flagged = base >= threshold  # "ends the flag" counts over the prompts flagged before any removal
    res = {"n": len(prompts), "threshold": threshold, "seeds": len(SEEDS), "score_before": base.tolist(),
           "flagged_before": int(flagged.sum()), "words_per_prompt": float(np.mean([len(t) for t in tokens])),
           "spread": int((flagged & (best_single >= threshold)).sum()), "methods": {}}
    exact_top = [order[0] for order in orders["exact_leave_one_out"]]
    for name, per_prompt in orders.items():
        curves = [[remove_tokens(model, t, [i for k in order[:n] for i in row[k]]) for n in range(1, len(order) + 1)]
                  for t, row, order in zip(prompts, groups, per_prompt)]
        flat = first_step_scores(model, [c for row in curves for c in row], SEEDS, steps).mean(1)
        cut = np.cumsum([0] + [len(row) for row in curves])
        rel = [flat[a:b] / s0 for a, b, s0 in zip(cut, cut[1:], base)]
        top1 = np.array([flat[a] for a in cut[:-1]])
        top_tokens = [toks[order[0]] for toks, order in zip(tokens, per_prompt)]
        function_first = np.array([t.strip().lower() in FUNCTION_WORDS for t in top_tokens])
        ends = (top1 < threshold) & flagged
        agrees = np.array([order[0] == top for order, top in zip(per_prompt, exact_top)])
        res["methods"][name] = {
            "deletion_auc": float(np.mean([r.mean() for r in rel])),
            "top1_ends_flag": float(ends.sum() / max(flagged.sum(), 1)),
            "top1_score_ratio": float(np.mean(top1 / base)),
            "top1_agrees_with_exact": float(agrees[flagged].mean()) if flagged.any() else float("nan"),
            "top1_agrees_with_exact_all": float(agrees.mean()),  # every prompt of the group, flagged or not
            "function_word_first": int((function_first & flagged).sum()),
            "function_word_first_ends_flag": int((function_first & ends).sum()),
            "evaluations_per_step": evaluations[name] / (len(prompts) * len(SEEDS)) if name in evaluations else None,
            "seconds_per_prompt": seconds[name] / len(prompts) if name in seconds else None,
            "top_tokens": top_tokens}
    return res


def explanation_tables(model, texts, kinds, positive: np.ndarray, scores: np.ndarray, steps: int, quick: bool) -> dict:
    """The deletion test on the duplicated captions (recall by text, the paper's case), on the other positives
    (copies without it) and, in the full run, on long prompts; flagged = at or above the negatives' 1 % threshold of
    `scores` (first step, mean of the seeds)."""
    threshold = threshold_at_fpr(scores[~positive], 0.01)
    memorized = [t for t, k in zip(texts, kinds) if k == "memorized"]
    groups = {"memorized": memorized[: 12 if quick else 40],
              "other_positives": [t for t, k, p in zip(texts, kinds, positive) if p and k != "memorized"][: 12 if quick
                                                                                                        else 40]}
    if not quick:  # the cheap order's goal: long prompts (n + 1 first-step passes a word for the exact reference)
        groups["memorized_long"] = long_prompts(memorized[:16], [t for t, k in zip(texts, kinds) if k == "ordinary"],
                                                model.tokenizers[0])
    return {name: explanation_bench(model, group, threshold, steps) for name, group in groups.items()}


def long_prompts(memorized, ordinary, tokenizer, length: int = 75):
    """Each memorized caption followed by ordinary captions (", "-joined) up to `length` tokens: the long prompts
    of the cheap explanation's goal, whose recall still comes from the memorized caption's words."""
    out = []
    for k, text in enumerate(memorized):
        filler = ordinary[k:] + ordinary[:k]
        words = text
        for extra in filler:
            longer = f"{words}, {extra}"
            if len(tokenizer(longer, add_special_tokens=False).input_ids) > length:
                break
            words = longer
        out.append(words)
    return out


AUTO_ROWS = (DEFAULT_MITIGATION, HOST_MITIGATION, "opposite_guidance_0.2", "new_noise_p50", "optimize_noise_p50",
             "remove_tokens_p50+opposite_0.1", "new_noise_p50+opposite_0.1", "remove_tokens_p50", "guidance_delay_0.3")


def mitigation_tables(model, evalset, prompts, positive: np.ndarray, first_step: np.ndarray, quick: bool,
                      target: Optional[float] = None, log=print, rows: Optional[Sequence[str]] = None) -> dict:
    """The mitigation table on the positives (always mode, every row; auto mode at the 1 % threshold of the
    negatives, the rows of AUTO_ROWS), and auto mode on ordinary training captions (images changed, new copies).
    rows: only these rows (always mode, and auto mode where they are auto rows)."""
    mitigated = [p for p, pos in zip(prompts, positive) if pos and p.scene is not None][: 8 if quick else 24]
    ordinary = [p for p, pos in zip(prompts, positive) if p.kind == "ordinary" and not pos][: 8 if quick else 24]
    negatives = first_step[~positive]
    threshold = threshold_at_fpr(negatives, 0.01)
    table = mitigation_settings(negatives)
    auto_rows = AUTO_ROWS
    if quick:  # one row per strategy
        table = {k: table[k] for k in (DEFAULT_MITIGATION, "minimize_p50", HOST_MITIGATION)}
        auto_rows = (DEFAULT_MITIGATION,)
    if rows is not None:
        unknown = sorted(set(rows) - set(table))
        if unknown:
            raise SystemExit(f"unknown mitigation rows {unknown}; rows: {', '.join(table)}")
        table = {k: table[k] for k in rows}
        auto_rows = tuple(k for k in auto_rows if k in table)
    if target is not None:
        table = {k: {**v, "target": target} if "target" in v else v for k, v in table.items()}
    out = {"mitigation": {}, "mitigation_auto": {}, "mitigation_ordinary_auto": {}, "mitigation_default": DEFAULT_MITIGATION,
           "mitigation_threshold": threshold}
    for name, settings in table.items():
        out["mitigation"][name] = r = mitigation_bench(model, mitigated, evalset, settings)
        log(f"  always {name:40s} copies {r['copy_rate_before']:.2f} -> {r['copy_rate_after']:.2f}, alignment "
            f"{r['alignment_before']:.2f} -> {r['alignment_after']:.2f}, collapsed {r['collapsed_share']:.2f}, "
            f"model calls {r['model_call_ratio']:.2f}x")
    for name in auto_rows:
        for key, label, group in (("mitigation_auto", "positives", mitigated),
                                  ("mitigation_ordinary_auto", "ordinary", ordinary)):
            out[key][name] = r = mitigation_bench(model, group, evalset, table[name], "auto", threshold)
            log(f"  auto {label:9s} {name:40s} changed {r['images_changed']}/{r['n_images']}, copies "
                f"{r['copy_rate_before']:.2f} -> {r['copy_rate_after']:.2f}, new copies {r['new_copies']}")
    return out


def mitigation_settings(negatives: np.ndarray) -> dict:
    """The rows of the mitigation table: each strategy over its strength; targets are benign percentiles."""
    p = lambda q: float(np.percentile(negatives, q))
    return {
        "remove_tokens_p50": dict(strategy="remove_tokens", target=p(50)),
        "remove_tokens_p75": dict(strategy="remove_tokens", target=p(75)),
        "remove_tokens_p50_max1": dict(strategy="remove_tokens", target=p(50), max_removals=1),
        "minimize_p50": dict(strategy="minimize", target=p(50)),
        "minimize_p25": dict(strategy="minimize", target=p(25)),
        "minimize_p90": dict(strategy="minimize", target=p(90)),
        "minimize_p50_lr0.2": dict(strategy="minimize", target=p(50), lr=0.2),
        "guidance_delay_0.1": dict(strategy="guidance_delay", delay=0.1),
        "guidance_delay_0.2": dict(strategy="guidance_delay", delay=0.2),
        "guidance_delay_0.3": dict(strategy="guidance_delay", delay=0.3),
        "opposite_guidance_0.1": dict(strategy="opposite_guidance", delay=0.1, early_scale=-1.0),
        "opposite_guidance_0.2": dict(strategy="opposite_guidance", delay=0.2, early_scale=-1.0),
        "opposite_guidance_0.2_s3": dict(strategy="opposite_guidance", delay=0.2, early_scale=-3.0),
        "new_noise_p50": dict(strategy="new_noise", target=p(50), noise_candidates=4),
        "new_noise_p50_c8": dict(strategy="new_noise", target=p(50), noise_candidates=8),
        "optimize_noise_p50": dict(strategy="optimize_noise", target=p(50)),
        "optimize_noise_p50_i1": dict(strategy="optimize_noise", target=p(50), max_iters=1),
        "remove_tokens_p50+guidance_delay_0.1": dict(strategy="remove_tokens+guidance_delay", target=p(50), delay=0.1),
        "remove_tokens_p50+opposite_0.1": dict(strategy="remove_tokens+opposite_guidance", target=p(50), delay=0.1,
                                               early_scale=-1.0),
        "new_noise_p50+opposite_0.1": dict(strategy="new_noise+opposite_guidance", target=p(50), delay=0.1,
                                           early_scale=-1.0),
        "mask_padding": dict(strategy="mask_padding", target=0.0),
        "mask_padding_p50": dict(strategy="mask_padding", target=p(50)),
        "mask_padding_half": dict(strategy="mask_padding", target=0.0, pad_share=0.5),
        "mask_padding+opposite_0.2_s3": dict(strategy="mask_padding+opposite_guidance", target=0.0, delay=0.2,
                                             early_scale=-3.0),
    }


COLLAPSE_RMSE = 0.1  # pixels in [0, 1]: an image this close to the empty prompt's image of its seed lost its prompt


def mitigation_bench(model, prompts, evalset, settings: dict, mode: str = "always",
                     threshold: Optional[float] = None) -> dict:
    """Copy rate, alignment, collapse and time of one strategy on `prompts` x SEEDS at MITIGATION_STEPS, timed
    side by side with plain sampling (twice; the second, warm pair counts). mode "auto" mitigates only images
    whose first-step score reaches `threshold`; new copies counts images that copy after and not before."""
    if not prompts:
        return {"n_prompts": 0}
    texts = [p.text for p in prompts for _ in SEEDS]
    scenes = [p.scene for p in prompts for _ in SEEDS]
    seeds = list(SEEDS) * len(prompts)
    cond, uncond = model.encode(texts), model.encode([""])
    noise_of = lambda s: initial_noise(model, model.latent_shape(), s, model.device)
    x = noise_of(seeds)
    ts = model.timesteps(MITIGATION_STEPS)
    plain_time, mitigated_time = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        plain = sample(model, cond, uncond, x, MITIGATION_STEPS, monitor=False)
        plain_time.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plan = mitigate(model, cond, uncond, x, ts, model.guidance, mode=mode, threshold=threshold, seeds=seeds,
                        noise_of=noise_of, **settings)
        start = x if plan.x_T is None else plan.x_T
        mitigated = sample(model, plan.cond, uncond, start, MITIGATION_STEPS, guidance=plan.guidance, monitor=False)
        mitigated_time.append(time.perf_counter() - t0)
    before, after = model.decode(plain.latents).numpy(), model.decode(mitigated.latents).numpy()
    empty = model.decode(sample(model, model.encode([""] * len(texts)), uncond, start, MITIGATION_STEPS,
                                monitor=False).latents).numpy()
    collapsed = np.sqrt(((after - empty) ** 2).mean((1, 2, 3))) < COLLAPSE_RMSE
    copy_before, copy_after = evalset.is_copy(before), evalset.is_copy(after)
    align_before, align_after = evalset.alignment(before, scenes), evalset.alignment(after, scenes)
    record = plan.record
    return {
        "settings": settings, "mode": mode, "threshold": threshold, "n_prompts": len(prompts), "n_images": len(texts),
        "steps": MITIGATION_STEPS, "images_changed": int(sum(n > 0 for n in record.image_iterations)),
        "copy_rate_before": float(copy_before.mean()), "copy_rate_after": float(copy_after.mean()),
        "copy_after_share_of_before": float(copy_after.mean() / max(copy_before.mean(), 1e-12)),
        "new_copies": int((copy_after & ~copy_before).sum()),
        "alignment_before": float(align_before.mean()), "alignment_after": float(align_after.mean()),
        "alignment_drop": float(1 - align_after.mean() / max(align_before.mean(), 1e-12)),
        "collapsed_share": float(collapsed.mean()),
        "score_before": float(np.mean(record.before)), "score_after": float(np.mean(record.after)),
        "time_ratio": mitigated_time[-1] / plain_time[-1],
        "model_call_ratio": extra_cost(record, MITIGATION_STEPS),  # what the time ratio becomes where the UNet dominates
        "mean_iterations": float(np.mean(record.image_iterations)), "batch_iterations": record.iterations,
        "removed": record.removed[::len(SEEDS)] if record.strategy.startswith("remove_tokens") else None,
    }


def overhead_bench(model, prompts, repeats: int) -> dict:
    """Sampling time with the score recorded / without, interleaved in one run (median of repeats)."""
    cond, uncond = model.encode(prompts), model.encode([""])
    x = initial_noise(model, model.latent_shape(), range(len(prompts)), model.device)
    on, off = [], []
    for _ in range(repeats):
        for monitor, bucket in ((True, on), (False, off)):
            t0 = time.perf_counter()
            sample(model, cond, uncond, x, 20, monitor=monitor)
            bucket.append(time.perf_counter() - t0)
    return {"monitor_step_ratio": float(np.median(on) / np.median(off)), "seconds_on": float(np.median(on)),
            "seconds_off": float(np.median(off)), "repeats": repeats, "batch": len(prompts), "steps": 20}


def labelled_run(description: str, argv=None, add_arguments=None):
    """The start the benchmark scripts share (benchmarks/*_table.py): their arguments, then the model, its evaluation
    set, that set's prompts, and each prompt's label and first-step score from an earlier full bench run of the same
    model (--labels). Returns (args, model, evalset, prompts, positive (P,) bool, first_step (P,), the labels' JSON)."""
    import argparse
    from ..standalone.diffusers_model import load_model
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--labels", type=Path, required=True, help="a full `bench --json` result (its prompts and labels)")
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--model", type=Path, default=None, help="the evaluation model the labels come from (default: bundled)")
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    labels = json.loads(args.labels.read_text())
    if labels.get("quick"):
        raise SystemExit("--labels must come from a full bench run (50-step labels of every prompt)")
    torch.manual_seed(0)
    model = load_model(args.model)
    evalset = eval_set_for(model)
    if labels.get("evaluation_set", "shapes") != evalset.name:
        raise SystemExit(f"--labels were measured on the {labels.get('evaluation_set')!r} set, the model is "
                         f"{evalset.name!r}")
    prompts = evalset.prompts(per_kind=100)
    by_text = {p["text"]: p for p in labels["prompts"]}
    positive = np.array([by_text[p.text]["positive"] for p in prompts])
    first_step = np.array([by_text[p.text]["steps1_gen1"] for p in prompts])
    return args, model, evalset, prompts, positive, first_step, labels


def run(args) -> int:
    from ..standalone.diffusers_model import load_model
    torch.manual_seed(0)
    model = load_model(args.model, prediction=args.prediction)
    res = run_bench(model, args.quick, args.target, detection_only=args.detection_only)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json} ({res['seconds']:.0f} s)")
    return 0
