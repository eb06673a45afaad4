"""What each first-step detector costs (issue 19, item 2): scoring prompts with `memoguard.measure.first_step_gaps`
under every detector, side by side in one process, as a ratio of the magnitude's time.

    .venv/bin/python benchmarks/detector_cost.py [--model PATH] [--prompts 16] [--repeats 3] [--json F]

The detectors alternate `--repeats` times (machines are noisy) and the medians give the ratios. The magnitude
needs one conditional UNet evaluation per prompt (the unconditional half is shared, once per scan); the
anisotropy detector two (the same x_T again at a low noise level), so its ratio tends to 2 where the UNet
dominates (SD sizes).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memoguard.calibration import default_benign_prompts  # noqa: E402
from memoguard.measure import first_step_gaps  # noqa: E402
from memoguard.score import DETECTORS  # noqa: E402
from memoguard.standalone.diffusers_model import load_model  # noqa: E402

STEPS = 50


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    prompts = default_benign_prompts()[:args.prompts]
    t_first = model.timesteps(STEPS)[0]
    first_step_gaps(model, prompts[:2], [0], model.latent_shape(), t_first, detector="anisotropy")  # warm-up
    seconds = {d: [] for d in DETECTORS}
    for _ in range(args.repeats):
        for detector in DETECTORS:
            start = time.perf_counter()
            first_step_gaps(model, prompts, [0], model.latent_shape(), t_first, args.batch_size, detector=detector)
            seconds[detector].append(time.perf_counter() - start)
    median = {d: statistics.median(v) for d, v in seconds.items()}
    result = {"model": model.name, "latent": list(model.latent_shape()), "prompts": len(prompts),
              "torch_threads": torch.get_num_threads(), "seconds": median,
              "ratio_to_magnitude": {d: median[d] / median["magnitude"] for d in DETECTORS}}
    for d in DETECTORS:
        print(f"{d:20s} {median[d]:8.2f} s  {result['ratio_to_magnitude'][d]:.2f}x the magnitude")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
