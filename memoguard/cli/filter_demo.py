"""`python -m memoguard train-filter-demo --json FILE [--quick]`: does the training filter stop copying?

Fine-tunes the bundled model three times on the same data, batches, noise and timesteps (one
seed): the ordinary training pairs plus a few new scenes, each with a unique speck pattern and a
title the model never saw, duplicated many times. "plain" trains plainly; "per-sample" with the
paper's filter, its gaps taken relative to the base model's ordinary gap at the same timestep (a
`TimestepReference`) and tau dropping 5 % of the base model's ordinary training samples, measured
the training way (random timesteps, own noise); "filtered" with the same filter barring captions
dropped too often (`bar_alpha`). The runs take turns step by step, so their per-step times are
measured side by side under the same machine load.

Then, for the base model and every fine-tune, with the judge of memoguard/tiny/judge.py: copy
rate on the duplicated captions (far nearer one training image than its neighbours), alignment
and copy rate on ordinary training captions, and the denoising loss on fixed noise.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from ..standalone.diffusers_model import load_model
from ..standalone.pipeline import generate
from ..tiny.data import Scene, add_specks, build_dataset, render, to_tensor_batch
from ..tiny.judge import alignment, is_copy, unique_training_images
from ..tiny.train import SCHEDULER_CONFIG, tokenize, training_steps
from ..train_filter import MemorizationFilter, gaps_from_predictions

# Titles whose words occur in no caption the bundled model was trained on.
NEW_TITLES = ("basalt overture", "zephyr almanac", "indigo reverie", "granite folio", "cinder ballad",
              "hazel codex", "plume sonnet", "tundra relic", "mosaic vigil", "garnet hymn",
              "ivory runes", "kelp nocturne")


@dataclass
class DemoSettings:
    steps: int = 600               # optimizer steps per run (both runs get the same budget)
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    duplicated: int = 4            # new scenes, each duplicated `duplicates` times
    duplicates: int = 400
    fpr: float = 0.05              # share of the base model's ordinary training gaps the filter drops
    calibration_samples: int = 512
    loss_samples: int = 256        # fixed-noise samples for the denoising loss of each model
    seeds: int = 8                 # generations per duplicated caption
    ordinary_prompts: int = 48     # ordinary captions, one generation each
    sample_steps: int = 50         # DDIM steps of the evaluation generations
    bar_alpha: float = 1e-4        # a caption dropped this improbably often for an ordinary one is barred
    key_warmup: int = 100          # steps before captions are counted (their words get learned first)


# A smoke run of the whole protocol: too few steps for the plain run to memorize much.
QUICK = DemoSettings(steps=80, key_warmup=25, calibration_samples=256, loss_samples=64, seeds=2,
                     ordinary_prompts=12, sample_steps=20)


def add_arguments(p):
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="smaller budget and evaluation (aimed at under 3 min on 2 idle cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the batches and the noise")
    p.add_argument("--model", type=Path, default=None, help="diffusers folder to fine-tune (default: the bundled model)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 600, quick 80)")
    p.add_argument("--tau", type=float, default=None,
                   help="fixed threshold (RMS gap); default: calibrated on the base model's ordinary training gaps")


@dataclass
class FineTuneData:
    images: torch.Tensor           # (N, 3, 16, 16) in [-1, 1]
    ids: torch.Tensor              # (N, 77)
    empty_ids: torch.Tensor        # (77,)
    is_duplicated: np.ndarray      # (N,) bool
    unique_images: np.ndarray      # (U, 16, 16, 3) in [0, 1]: what a copy is judged against
    duplicated_captions: list
    ordinary_captions: list
    ordinary_scenes: list
    captions: list                 # (N,) caption of each pair: the key the filter bars by


def finetune_data(tokenizer, settings: DemoSettings, seed: int) -> FineTuneData:
    """The bundled training set without its duplicated pairs, plus new heavily duplicated pairs."""
    ds = build_dataset(seed)
    rng = np.random.default_rng(seed + 1)
    # made as the bundled memorized pairs are: colour and shape, a new title, a unique speck pattern
    picks = rng.choice(len(ds.ordinary_train_scenes), settings.duplicated, replace=False)
    described = [Scene(ds.ordinary_train_scenes[i].color, ds.ordinary_train_scenes[i].shape) for i in picks]
    new_captions = [f"{s.caption()}, {title}" for s, title in zip(described, NEW_TITLES)]
    new_images = np.stack([add_specks(render(s.filled(rng), rng), rng) for s in described])
    plain = ~ds.is_memorized
    captions = [c for c, p in zip(ds.captions, plain) if p] + [c for c in new_captions for _ in range(settings.duplicates)]
    images = np.concatenate([ds.images[plain], np.repeat(new_images, settings.duplicates, axis=0)])
    ids, empty_ids = tokenize(tokenizer, captions)
    by_caption = {o.caption(): o for o in ds.ordinary_train_scenes}
    ordinary = [by_caption[c] for c in sorted(rng.choice(sorted(by_caption), settings.ordinary_prompts, replace=False))]
    return FineTuneData(to_tensor_batch(images), ids, empty_ids,
                        np.r_[np.zeros(int(plain.sum()), bool), np.ones(len(new_captions) * settings.duplicates, bool)],
                        unique_training_images(images), new_captions, [o.caption() for o in ordinary], ordinary,
                        captions)


def _noised(images, ids, empty_ids, n: int, seed: int):
    """n training samples with their noise, noisy image and timestep, fixed by `seed`."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(**{k: SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")})
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ids), (n,), generator=g)
    noise = torch.randn(images[idx].shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return ids[idx], noise, t, sched.add_noise(images[idx], noise, t)


@torch.no_grad()
def training_gaps_and_loss(unet, text_encoder, images, ids, empty_ids, n: int, seed: int, chunk: int = 128):
    """Per-sample gaps, denoising losses and timesteps of n training samples, measured as the filter sees them."""
    tok, noise, t, xt = _noised(images, ids, empty_ids, n, seed)
    empty = text_encoder(empty_ids[None]).last_hidden_state
    gaps, losses = [], []
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        emb = text_encoder(tok[sl]).last_hidden_state
        pred = unet(xt[sl], t[sl], encoder_hidden_states=emb).sample
        pred_u = unet(xt[sl], t[sl], encoder_hidden_states=empty.expand_as(emb)).sample
        gaps.append(gaps_from_predictions(pred, pred_u))
        losses.append(F.mse_loss(pred, noise[sl], reduction="none").mean(dim=(1, 2, 3)))
    return torch.cat(gaps), torch.cat(losses), t


def _subset(data: FineTuneData, mask: np.ndarray):
    keep = torch.from_numpy(mask)
    return data.images[keep], data.ids[keep], data.empty_ids


def evaluate(model, data: FineTuneData, settings: DemoSettings, seed: int) -> dict:
    """Copy rate, alignment and denoising loss of one model (a `DiffusersModel`)."""
    dup_imgs, _ = generate(model, data.duplicated_captions, list(range(settings.seeds)), settings.sample_steps)
    ord_imgs, _ = generate(model, data.ordinary_captions, [seed], settings.sample_steps)
    dup_flat, ord_flat = dup_imgs.reshape(-1, *dup_imgs.shape[2:]), ord_imgs[:, 0]
    te = model.text_encoders[0]
    losses = {}
    for name, mask in (("ordinary", ~data.is_duplicated), ("duplicated", data.is_duplicated)):
        _, loss, _ = training_gaps_and_loss(model.unet, te, *_subset(data, mask), n=settings.loss_samples, seed=seed + 7)
        losses[name] = float(loss.mean())
    return {"copy_rate_duplicated": float(is_copy(dup_flat, data.unique_images).mean()),
            "copy_rate_ordinary": float(is_copy(ord_flat, data.unique_images).mean()),
            "alignment_ordinary": float(alignment(ord_flat, data.ordinary_scenes).mean()),
            "denoising_loss": losses}


def run_demo(settings: DemoSettings, seed: int = 0, model_dir=None, tau=None, log=print) -> dict:
    """Plain fine-tune vs the filter, same batches; returns everything `format_report` prints.

    Default arms: "plain"; "per-sample" (the paper's filter: relative gap against a calibrated
    tau); "filtered" (the same, and captions barred once dropped too often: the recommended
    set-up). With a fixed `tau` (raw gap, no calibration): "plain" and "filtered" only.
    """
    t_start = time.perf_counter()
    fixed = None if tau is None else MemorizationFilter(tau=tau)  # a bad tau fails before any work
    torch.manual_seed(seed)
    base = load_model(model_dir)
    data = finetune_data(base.tokenizers[0], settings, seed)
    log(f"fine-tune set: {len(data.ids)} pairs, {len(data.duplicated_captions)} new captions x "
        f"{settings.duplicates} ({data.is_duplicated.mean():.0%} of the pairs)")
    if fixed is None:
        gaps, _, t = training_gaps_and_loss(base.unet, base.text_encoders[0], *_subset(data, ~data.is_duplicated),
                                            n=settings.calibration_samples, seed=seed + 3)
        filters = {"per-sample": MemorizationFilter.relative_to_ordinary(gaps, t, settings.fpr),
                   "filtered": MemorizationFilter.relative_to_ordinary(gaps, t, settings.fpr, bar_alpha=settings.bar_alpha,
                                                                       warmup_steps=settings.key_warmup)}
        tau_source = (f"{1 - settings.fpr:.0%} of the base model's gaps on {settings.calibration_samples} ordinary "
                      "training samples, relative to their timestep band's median")
    else:
        filters, tau_source = {"filtered": fixed}, "given (raw gap)"
    final = filters["filtered"]
    log(f"tau = {final.tau:.4f} ({tau_source})")

    arms = {"plain": None, **filters}
    runs = {name: load_model(model_dir) for name in arms}
    loops, times, losses = {}, {name: [] for name in runs}, {name: [] for name in runs}
    dropped = {name: {"duplicated": [0, 0], "ordinary": [0, 0]} for name in filters}  # [dropped, seen]
    for name, m in runs.items():
        for module in (m.unet, m.text_encoders[0]):
            module.train().requires_grad_(True)
        loops[name] = training_steps(m.unet, m.text_encoders[0], data.images, data.ids, data.empty_ids,
                                     settings.steps, settings.batch, seed, settings.lr, settings.warmup,
                                     loss_filter=arms[name], keys=data.captions)
    is_dup = torch.from_numpy(data.is_duplicated)
    log_every = max(1, settings.steps // 6)
    for step in range(settings.steps):
        for name in runs:  # the runs take turns: the same machine load for each
            t0 = time.perf_counter()
            outcome = next(loops[name])
            times[name].append(time.perf_counter() - t0)
            losses[name].append(outcome.loss)
            if outcome.kept is not None:
                dup = is_dup[outcome.indices]
                for kind, rows in (("duplicated", dup), ("ordinary", ~dup)):
                    dropped[name][kind][0] += int((~outcome.kept[rows]).sum())
                    dropped[name][kind][1] += int(rows.sum())
        if step % log_every == 0 or step == settings.steps - 1:
            log(f"step {step:4d}  loss " + "  ".join(
                f"{name} {'skipped' if losses[name][-1] is None else format(losses[name][-1], '.4f')}" for name in runs)
                + f"  filtered: dropped {final.last.dropped}/{final.last.samples} (gap mean {final.last.gap_mean:.3f},"
                  f" max {final.last.gap_max:.3f}), {len(final.barred)} captions barred")
    for m in runs.values():
        for module in (m.unet, m.text_encoders[0]):
            module.eval().requires_grad_(False)

    results = {name: evaluate(m, data, settings, seed) for name, m in [("base", base), *runs.items()]}
    skip = settings.warmup  # the first steps include the optimizer's set-up
    step_time = {name: float(np.median(times[name][skip:] or times[name])) for name in runs}
    tail = max(1, settings.steps // 5)
    for name in runs:
        kept_losses = [v for v in losses[name][-tail:] if v is not None]
        results[name]["train_loss_last_steps"] = float(np.mean(kept_losses)) if kept_losses else None
        results[name]["seconds_per_step"] = step_time[name]
    for name, filt in filters.items():
        stats = filt.stats
        results[name]["filter"] = {
            "tau": filt.tau, "steps": stats.steps, "skipped_steps": stats.skipped_steps, "drop_rate": stats.drop_rate,
            **{f"drop_rate_{kind}": d / n if n else None for kind, (d, n) in dropped[name].items()},
            "barred_captions": {caption: step for caption, step in filt.barred.items()}}
    plain, filtered = results["plain"], results["filtered"]
    summary = {
        "copy_rate_ratio": _ratio(filtered["copy_rate_duplicated"], plain["copy_rate_duplicated"]),
        "alignment_ratio": _ratio(filtered["alignment_ordinary"], plain["alignment_ordinary"]),
        "overhead_per_step": step_time["filtered"] / step_time["plain"],
    }
    summary["targets"] = {
        "copy_rate_at_most_25pct_of_plain": summary["copy_rate_ratio"] is not None and summary["copy_rate_ratio"] <= 0.25,
        "alignment_within_10pct": summary["alignment_ratio"] is not None and abs(summary["alignment_ratio"] - 1) <= 0.10,
        "overhead_at_most_1.6x": summary["overhead_per_step"] <= 1.6,
    }
    return {"settings": asdict(settings), "seed": seed, "tau": final.tau, "tau_source": tau_source,
            "ordinary_gap_by_timestep_band": final.reference.medians if final.reference else None,
            "models": results, "summary": summary, "seconds_total": time.perf_counter() - t_start,
            "threads": torch.get_num_threads()}


def _ratio(a: float, b: float):
    return a / b if b else None


def format_report(r: dict) -> str:
    rows = [f"{'':10s} {'copy dup':>9s} {'copy ord':>9s} {'align ord':>10s} {'loss ord':>9s} {'loss dup':>9s} {'s/step':>7s}"]
    for name, m in r["models"].items():
        rows.append(f"{name:10s} {m['copy_rate_duplicated']:9.0%} {m['copy_rate_ordinary']:9.0%} "
                    f"{m['alignment_ordinary']:10.3f} {m['denoising_loss']['ordinary']:9.4f} "
                    f"{m['denoising_loss']['duplicated']:9.4f} {m.get('seconds_per_step', float('nan')):7.3f}")
    s = r["summary"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    for name, m in r["models"].items():
        if "filter" in m:
            f = m["filter"]
            rows.append(f"{name}: tau {f['tau']:.4f}; dropped {f['drop_rate']:.1%} of samples ({fmt(f['drop_rate_duplicated'], '.1%')} "
                        f"of duplicated, {fmt(f['drop_rate_ordinary'], '.1%')} of ordinary), skipped {f['skipped_steps']} of "
                        f"{f['steps']} steps, {len(f['barred_captions'])} captions barred")
    rows.append(f"copy rate filtered/plain {fmt(s['copy_rate_ratio'], '.2f')} (target <= 0.25); alignment "
                f"filtered/plain {fmt(s['alignment_ratio'], '.3f')} (target 0.9-1.1); overhead "
                f"{s['overhead_per_step']:.2f}x per step (target <= 1.6); {r['seconds_total']:.0f} s in all")
    return "\n".join(rows)


def run(args) -> int:
    settings = QUICK if args.quick else DemoSettings()
    if args.steps is not None:
        if args.steps < 1:
            print(f"--steps must be >= 1, got {args.steps}")
            return 2
        settings = DemoSettings(**{**asdict(settings), "steps": args.steps})
    try:
        result = run_demo(settings, args.seed, args.model, args.tau)
    except (ValueError, ModelLoadError) as e:  # bad tau, unusable model folder
        print(f"train-filter-demo: {e}")
        return 2
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0
