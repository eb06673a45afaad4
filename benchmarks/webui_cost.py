"""Explanation and mitigation time inside a real A1111 WebUI or Forge, as a ratio of one plain generation at the same
settings.

    python benchmarks/webui_cost.py --host a1111 --root /path/to/stable-diffusion-webui CHECKPOINT [--python PY]
        [--steps 10] [--size 256] [--repeats 3] [--long]

CHECKPOINT: an SD1.5-size checkpoint (tests/hosts/make_random_checkpoint.py makes one with random weights). The WebUI
(`--host a1111` or `forge`, its folder `--root`, its venv's Python by default) is launched headless on the CPU with
the extension, as the real-host suites launch it (tests/a1111/real_host.py), and driven through its txt2img API:
one image, Euler at cfg 7.5, the prompt "a purple ring, lighthouse poster" (6 words). Timed side by side against the
same running server, medians of --repeats interleaved requests (each request's wall time: encoding, sampling,
decoding and the PNG, as a user waits for it):
- plain: no script;
- monitor only: the MemoGuard script with everything off (the score);
- mitigation (mode always, target 0) per strategy: mask_padding (the default), remove_tokens, opposite_guidance;
- explanation: the script with Explain tokens on (its default, leave-one-out re-encoded by the WebUI, one step).
--long: instead, plain and the explanation of comfyui_cost.py's 57-word prompt (64 tokens), by the default (screened
leave-one-out: the 12 words a first-order estimate ranks first) and by exact leave-one-out.
Prints seconds and ratios.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from comfyui_cost import LONG_PROMPT, PROMPT
from side_by_side import interleaved_medians, print_ratios

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "a1111"))
from real_host import launch_flags, running_webui, txt2img  # noqa: E402

MONITOR = [1, 0, "", 0.01, False, 1, "off", 0, 0.05, 10]  # window, threshold, file, fpr, explain, steps, mitigation ...


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--host", choices=("a1111", "forge"), required=True)
    ap.add_argument("--root", type=Path, required=True, help="the WebUI's folder")
    ap.add_argument("--python", help="its Python (default: ROOT/venv/bin/python)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="plain and explanation of a 57-word prompt only")
    args = ap.parse_args()
    python = args.python or str(args.root / "venv" / "bin" / "python")
    settings = dict(steps=args.steps, width=args.size, height=args.size, cfg_scale=7.5)
    if args.long:  # script_args[12]: the explanation method (after strategy and delay)
        runs = {"plain": (None, LONG_PROMPT)}  # the 57-word prompt
        for method in ("auto", "leave_one_out"):
            runs[f"explanation, 57 words, {method}"] = (MONITOR[:4] + [True] + MONITOR[5:] + ["mask_padding", 0,
                                                                                          method], LONG_PROMPT)
    else:
        runs = {"plain": (None, PROMPT), "monitor only": (MONITOR, PROMPT)}
        for strategy in ("mask_padding", "remove_tokens", "opposite_guidance"):
            runs[f"mitigation {strategy}"] = (MONITOR[:6] + ["always", 0, 0.05, 10, strategy], PROMPT)
        runs["explanation (leave-one-out, 1 step)"] = (MONITOR[:4] + [True] + MONITOR[5:], PROMPT)
    with tempfile.TemporaryDirectory() as data, \
            running_webui(args.root, python, launch_flags(args.host, args.checkpoint), Path(data)) as base:
        medians = interleaved_medians({name: (lambda a=script_args, text=prompt: txt2img(
            base, "Euler", a, prompt=text, **settings)) for name, (script_args, prompt) in runs.items()},
            args.repeats)
    print(f"{args.host} {args.root}, {args.checkpoint}: {args.size}x{args.size}, {args.steps} Euler steps, cfg 7.5, "
          f"one image, {args.repeats} repeats; CPU")
    print_ratios(medians)


if __name__ == "__main__":
    main()
