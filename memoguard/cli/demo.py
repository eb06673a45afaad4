"""`python -m memoguard demo --out DIR`: the whole method on the bundled model, as a report.

For a few memorized and a few ordinary prompts: sample with a live per-step score, give the
verdict with its percentile, the per-token contributions, and the image after mitigation,
each next to the nearest training image. Writes DIR/report.html (+ PNGs).
"""
import html
import sys
import time
from pathlib import Path

import numpy as np

from .. import report
from ..calibration_lookup import run_detector
from ..explain import token_contributions
from ..mitigate import mitigate
from ..standalone.pipeline import DEFAULT_STEPS
from ..sampling import initial_noise, sample
from .lib.inputs import load_calibration
from ..verdict import verdict_for

DEMO_SEED = 7


def demo_prompts():
    from ..tiny.data import build_dataset
    ds = build_dataset(0)
    # three duplicated captions that copied in all of 5 seeds we tried, then three that are not duplicated
    return ([(ds.memorized_captions[i], "duplicated caption") for i in (3, 13, 15)]
            + [(ds.novel_scenes[0].caption(), "novel caption"), (ds.ordinary_train_scenes[0].caption(), "training caption"),
               (ds.novel_scenes[1].caption_other_style(), "another style")])


def progress(prefix: str):
    first = []

    def on_step(i, total, gaps):
        if not first:
            first.append(float(gaps[0]))
        done = int(30 * (i + 1) / total)
        sys.stderr.write(f"\r  {prefix[:38]:38} [{'#' * done}{'.' * (30 - done)}] {i + 1:2d}/{total} "
                         f"gap {float(gaps[0]):.4f} (first step {first[0]:.4f})")
        if i + 1 == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return on_step


def add_arguments(p):
    p.add_argument("--out", type=Path, required=True, help="folder for report.html and its pictures")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps per image")
    p.add_argument("--fpr", type=float, default=0.01, help="benign false-positive rate of the threshold")


def run(args) -> int:
    from ..standalone.diffusers_model import load_model
    from ..tiny.data import build_dataset
    from ..tiny.judge import COPY_RATIO, nearest_training, unique_training_images
    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = load_model()
    calibration, notes = load_calibration(None, model, args.steps)
    threshold = calibration.threshold(args.fpr) if calibration else None
    detector = run_detector(calibration)
    levels = [model.noise_level(t) for t in model.timesteps(args.steps)]
    band = [calibration.band.at(s) if calibration and calibration.band else None for s in levels]
    train_images = unique_training_images(build_dataset(0).images)
    uncond = model.encode([""])
    parts = [f"<p>Bundled tiny model, DDIM {args.steps} steps, guidance {model.guidance}, seed {DEMO_SEED}. "
             f"Verdict from the first-step score against the {100 * args.fpr:g}% false-positive threshold of "
             f"{calibration.meta.get('prompts', 0) if calibration else 0} benign prompts"
             f"{f' ({threshold:.4f})' if threshold else ' (no calibration found: scores only)'}. "
             + (f"The shaded band under each line is where benign prompts lie at each step: from the median up to "
                f"the level only {100 * calibration.band.fpr:g}% of benign runs exceed at that step (fitted to "
                f"{calibration.band.settings.get('prompts', '?')} benign runs at guidance "
                f"{calibration.band.settings.get('guidance', '?')}, placed by noise level); "
                f"the verdict reads the first step, the column the threshold is drawn across. "
                if calibration and calibration.band else "")
             + "".join(f"Note: {html.escape(n)}. " for n in notes) +
             f"A generation counts as a copy when its distance to the nearest training image is under {COPY_RATIO} "
             f"times its mean distance to the next 49 (Carlini et al.'s test).</p>",
             "<table><tr><th>prompt</th><th>generated | nearest training image</th><th>score per step</th>"
             "<th>token contributions</th><th>after mitigation | nearest</th></tr>"]
    sheet_rows, sheet_captions = [], []
    print(f"MemoGuard demo on the bundled model -> {out / 'report.html'}")
    for k, (prompt, kind) in enumerate(demo_prompts()):
        cond = model.encode([prompt])
        x = initial_noise(model, model.latent_shape(), [DEMO_SEED], model.device)
        result = sample(model, cond, uncond, x, args.steps, on_step=progress(prompt), detector=detector)
        verdict = verdict_for(result.trace, calibration, fpr=args.fpr, images=1, notes=notes)[0]
        image = model.decode(result.latents).numpy()
        near_idx, _, near_r = nearest_training(image, train_images)
        contrib = token_contributions(model, cond, uncond, x, total_steps=args.steps, detector=detector)[0]
        plan = mitigate(model, cond, uncond, x, model.timesteps(args.steps), model.guidance,
                        mode="auto" if threshold else "always", threshold=threshold,
                        target=calibration.median if calibration else 0.0, detector=detector)
        record = plan.record
        mitigated = model.decode(sample(model, plan.cond, uncond, x, args.steps, guidance=plan.guidance,
                                        monitor=False).latents).numpy()
        m_idx, _, m_r = nearest_training(mitigated, train_images)
        copied, still_copies = near_r[0] < COPY_RATIO, record.ran and m_r[0] < COPY_RATIO
        print(f"  -> {verdict.summary()}; copy ratio {near_r[0]:.2f}{' (COPY)' if copied else ''}; "
              + contrib.summary(threshold if verdict.flagged else None))
        if record.ran:
            print(f"     mitigation: {record.summary()}; copy ratio {m_r[0]:.2f}"
                  f"{' (STILL COPIES)' if still_copies else ''}")
        files = {"gen": report.image_strip(np.stack([image[0], train_images[near_idx[0]]])),
                 "plot": report.score_plot([result.trace.per_step()[:, 0].tolist()], threshold, [verdict.label],
                                           band=band, window=1),
                 "tokens": report.token_bars(contrib.tokens, contrib.shares),
                 "mitigated": report.image_strip(np.stack([mitigated[0], train_images[m_idx[0]]]))}
        for name, img in files.items():
            img.save(out / f"{k}_{name}.png")
        sheet_rows.append(list(files.values()))
        sheet_captions.append(f"{prompt}  [{kind}]  {verdict.summary()}"
                              + (f"  | {record.strategy_name}: {record.before[0]:.3f} -> {record.after[0]:.3f}, "
                                 f"{'STILL COPIES' if still_copies else 'no copy' if copied else 'no copy before either'}"
                                 if record.ran else ""))
        cls = "flag" if verdict.flagged else "ok"
        if not record.ran:
            mit = html.escape(f"{record.strategy_name}: not run ({record.reason})")
        else:
            outcome = ("<b class='flag'>still copies a training image</b>" if still_copies else
                       "no longer copies" if copied else "did not copy before either")
            mit = (f"{html.escape(record.summary())}<br>prompt used: <i>{html.escape(' '.join(plan.cond.prompt_tokens(0)))}"
                   f"</i><br>copy ratio {m_r[0]:.2f}: {outcome}")
        parts.append(
            f"<tr><td><b>{html.escape(prompt)}</b><br><i>{kind}</i><br><span class='{cls}'>{html.escape(verdict.summary())}</span>"
            f"<br>copy ratio {near_r[0]:.2f}{' <b>(copy)</b>' if near_r[0] < COPY_RATIO else ''}</td>"
            f"<td><img src='{k}_gen.png'></td><td><img src='{k}_plot.png'></td>"
            f"<td>{report.tokens_html(contrib.tokens, contrib.shares)}<br><img src='{k}_tokens.png'>"
            f"<br><small>{html.escape(contrib.summary(threshold if verdict.flagged else None))}</small></td>"
            f"<td><img src='{k}_mitigated.png'><br>{mit}</td></tr>")
    parts.append("</table>")
    (out / "report.html").write_text(report.html_page("MemoGuard demo", parts), encoding="utf-8")
    report.summary_sheet(sheet_rows, sheet_captions).save(out / "summary.png")
    print(f"wrote {out / 'report.html'} in {time.time() - t0:.0f} s")
    return 0

