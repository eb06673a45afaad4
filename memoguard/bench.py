"""`python -m memoguard bench --json FILE [--quick]`: every claim, measured on the bundled model.

Protocol (Wen et al.): each evaluation prompt is sampled with G seeds; a prompt is a positive
when at least half of its generations copy a training image (judge.py), whatever its kind.
Scores come from those same generations' guided DDIM runs: first step, one generation
(steps1_gen1); first step averaged over 4 generations (steps1_gen4); first 10 steps x 4
generations (steps10_gen4). AUC and TPR@1%FPR are given pooled and per negative kind.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch

from .calibration import roc_auc, tpr_at_fpr
from .explain import token_contributions
from .mitigate import minimize_embedding
from .pipeline import generate
from .sampling import initial_noise, sample
from .tiny.data import build_dataset
from .tiny.judge import COPY_RATIO, alignment, is_copy, unique_training_images
from .tiny.prompts import KINDS, eval_prompts

MITIGATION_STEPS = 20
SEEDS = (0, 1, 2, 3)


def add_arguments(p):
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="fewer prompts and a 20-step schedule (< 2 min on 2 cores)")
    p.add_argument("--model", type=Path, default=None, help="diffusers folder or .safetensors/.ckpt (default: the bundled model)")
    p.add_argument("--prediction", choices=("auto", "eps", "v"), default="auto",
                   help="a checkpoint file's prediction type; auto: see memoguard.checkpoints (default auto)")
    p.add_argument("--target", type=float, default=None,
                   help="mitigation target (RMS gap); default: the median first-step score of the negatives")


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


def threshold_at_fpr(negative_scores: np.ndarray, fpr: float = 0.01) -> float:
    """Smallest threshold that flags at most `fpr` of the negatives."""
    s = np.sort(negative_scores)
    k = min(len(s) - 1, int(np.ceil((1 - fpr) * len(s))) - 1)
    return float(np.nextafter(s[k], np.inf))


def remove_token(model, prompt: str, position: int) -> str:
    """The prompt with the token at embedding position `position` (first chunk) taken out."""
    tok = model.tokenizers[0]
    ids = tok(prompt, add_special_tokens=False).input_ids
    chunk, slot = divmod(position, 77)
    del ids[chunk * 75 + slot - 1]
    return tok.decode(ids)


def run_bench(model, quick: bool, target=None, log=print) -> dict:
    t_start = time.time()
    ds = build_dataset(0)
    train_images = unique_training_images(ds.images)
    prompts = eval_prompts(ds, per_kind=20 if quick else 100)
    label_steps = 20 if quick else 50
    texts = [p.text for p in prompts]
    kinds = np.array([p.kind for p in prompts])
    log(f"labelling {len(texts)} prompts x {len(SEEDS)} seeds, DDIM {label_steps} steps ...")
    images, gaps = generate(model, texts, SEEDS, steps=label_steps)
    copies = is_copy(images.reshape(-1, *images.shape[2:]), train_images).reshape(len(texts), len(SEEDS))
    positive = copies.mean(1) >= 0.5
    res = {"model": getattr(model, "name", "model"), "quick": quick, "label_steps": label_steps,
           "copy_ratio": COPY_RATIO, "guidance": model.guidance, "seeds": list(SEEDS),
           "labels": {k: {"prompts": int((kinds == k).sum()), "positives": int(positive[kinds == k].sum())}
                      for k in KINDS}}
    scores = {"steps1_gen1": gaps[:, 0, 0], "steps1_gen4": gaps[:, :, 0].mean(1),
              "steps10_gen4": gaps[:, :, :10].mean((1, 2))}
    res["detection"] = {k: detection_metrics(v, positive, kinds) for k, v in scores.items()}
    res["prompts"] = [{"text": t, "kind": k, "copy_rate": float(c), "positive": bool(p), "steps1_gen1": float(s)}
                      for t, k, c, p, s in zip(texts, kinds, copies.mean(1), positive, scores["steps1_gen1"])]
    # the same scores with labels by intent: duplicated captions against every other kind
    res["detection_by_intent"] = {k: detection_metrics(v, kinds == "memorized", kinds) for k, v in scores.items()}
    log(f"positives {int(positive.sum())}/{len(texts)}; steps1_gen1 AUC {res['detection']['steps1_gen1']['auc']:.3f}")

    threshold = threshold_at_fpr(scores["steps1_gen4"][~positive])
    explained = [(t, k) for t, k, p in zip(texts, kinds, positive) if p][: 10 if quick else 40]
    res["explanation"] = explanation_bench(model, [t for t, _ in explained], threshold, label_steps)
    res["explanation"]["kinds"] = [k for _, k in explained]
    log(f"explanation: top-token drop {res['explanation']['top_token_drop_rate']:.2f}, "
        f"random {res['explanation']['random_token_drop_rate']:.2f}")

    mitigated = [p for p, pos in zip(prompts, positive) if pos and p.scene is not None][: 8 if quick else 24]
    negatives = scores["steps1_gen1"][~positive]
    res["mitigation"] = mitigation_bench(model, mitigated, train_images,
                                         float(np.median(negatives)) if target is None else target)
    if not quick:  # the copy / faithfulness / time trade-off over the target: benign 75th, 90th percentiles
        res["mitigation_sweep"] = {f"target_p{q}": mitigation_bench(model, mitigated, train_images,
                                                                    float(np.percentile(negatives, q)))
                                   for q in (75, 90)}
    log(f"mitigation: copy {res['mitigation']['copy_rate_before']:.2f} -> {res['mitigation']['copy_rate_after']:.2f}, "
        f"time ratio {res['mitigation']['time_ratio']:.2f}")
    res["band"] = band_bench(model, texts, positive, gaps, label_steps, quick)
    log(f"band: benign inside at every step {res['band']['same_schedule']['benign_inside_every_step']:.2f}, "
        f"positives above at step 1 {res['band']['same_schedule']['positive_above_step1']:.2f}")
    res["overhead"] = overhead_bench(model, texts[:16], repeats=3 if quick else 7)
    res["seconds"] = round(time.time() - t_start, 1)
    return res


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


def band_bench(model, texts, positive: np.ndarray, gaps: np.ndarray, steps: int, quick: bool) -> dict:
    """Issue 9's band, measured: a benign band from calibration prompts (none of the bench's) at the model's
    guidance, placed under the bench's own runs by noise level; then under a run with half the steps (does
    one band serve another step count?) and at guidance 7.5 (does it serve another CFG scale?)."""
    from .calibrate import tiny_benign_prompts
    from .calibration import Band
    from .measure import band_gaps
    shape = model.latent_shape()
    n_band = 16 if quick else 64
    t0 = time.perf_counter()
    band_runs = band_gaps(model, tiny_benign_prompts()[:n_band], 1000, shape, steps, model.guidance)
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


def explanation_bench(model, prompts, threshold: float, steps: int) -> dict:
    from .pipeline import first_step_scores
    uncond = model.encode([""])
    rng = np.random.default_rng(0)
    top_removed, random_removed, top_tokens, removed_random = [], [], [], []
    for text in prompts:
        cond = model.encode([text])
        x = initial_noise(model, model.latent_shape(), SEEDS, model.device)
        contrib = token_contributions(model, cond, uncond, x, steps=1, total_steps=steps)[0]
        best = int(np.argmax(contrib.scores))
        top_tokens.append(contrib.tokens[best])
        top_removed.append(remove_token(model, text, contrib.positions[best]))
        pick = int(rng.integers(len(contrib.positions)))
        removed_random.append(contrib.tokens[pick])
        random_removed.append(remove_token(model, text, contrib.positions[pick]))
    if not prompts:
        return {"top_token_drop_rate": float("nan"), "random_token_drop_rate": float("nan"), "n": 0}
    top_scores = first_step_scores(model, top_removed, SEEDS, steps).mean(1)
    rand_scores = first_step_scores(model, random_removed, SEEDS, steps).mean(1)
    return {"top_token_drop_rate": float((top_scores < threshold).mean()),
            "random_token_drop_rate": float((rand_scores < threshold).mean()),
            "threshold": threshold, "n": len(prompts), "top_tokens": top_tokens, "random_tokens": removed_random,
            "top_removed_scores": top_scores.tolist(), "random_removed_scores": rand_scores.tolist()}


def mitigation_bench(model, prompts, train_images, target: float) -> dict:
    if not prompts:
        keys = ("copy_rate_before", "copy_rate_after", "alignment_before", "alignment_after", "time_ratio",
                "mean_iterations")
        return {"n_prompts": 0, **{k: float("nan") for k in keys}}
    texts = [p.text for p in prompts for _ in SEEDS]
    scenes = [p.scene for p in prompts for _ in SEEDS]
    cond, uncond = model.encode(texts), model.encode([""])
    x = initial_noise(model, model.latent_shape(), list(SEEDS) * len(prompts), model.device)
    plain_time, mitigated_time = [], []
    for _ in range(2):  # side by side, twice; the second pair is the one timed warm
        t0 = time.perf_counter()
        plain = sample(model, cond, uncond, x, MITIGATION_STEPS, monitor=False)
        plain_time.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        emb, record = minimize_embedding(model, cond, uncond, x, model.timesteps(MITIGATION_STEPS)[0], target=target)
        mitigated = sample(model, cond, uncond, x, MITIGATION_STEPS, monitor=False, cond_embedding=emb)
        mitigated_time.append(time.perf_counter() - t0)
    before, after = model.decode(plain.latents).numpy(), model.decode(mitigated.latents).numpy()
    return {
        "n_prompts": len(prompts), "n_images": len(texts), "steps": MITIGATION_STEPS, "target": target,
        "copy_rate_before": float(is_copy(before, train_images).mean()),
        "copy_rate_after": float(is_copy(after, train_images).mean()),
        "alignment_before": float(alignment(before, scenes).mean()),
        "alignment_after": float(alignment(after, scenes).mean()),
        "score_before": float(np.mean(record.before)), "score_after": float(np.mean(record.after)),
        "time_ratio": mitigated_time[-1] / plain_time[-1],
        "mean_iterations": float(np.mean(record.image_iterations)), "batch_iterations": record.iterations,
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


def run(args) -> int:
    from .diffusers_model import load_model
    torch.manual_seed(0)
    model = load_model(args.model, prediction=args.prediction)
    res = run_bench(model, args.quick, args.target)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json} ({res['seconds']:.0f} s)")
    return 0
