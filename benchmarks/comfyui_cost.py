"""Explanation and mitigation time inside ComfyUI as a ratio of one plain generation at the same settings.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfyui_cost.py CHECKPOINT [--steps 10] [--size 256] [--repeats 3]

Run with ComfyUI's Python. CHECKPOINT: an SD1.5-size checkpoint (tests/hosts/make_random_checkpoint.py makes one with
random weights), loaded by ComfyUI's own checkpoint loader. One image, Euler at cfg 7.5, the prompt "a purple ring,
lighthouse poster" (6 words). Timed side by side in one process, medians of --repeats interleaved runs:
- plain: CLIP Text Encode + KSampler's sampling (comfy.sample.sample);
- mitigation: the same with MemoGuard Text Encode and MemoGuard Mitigation (mode always, target 0) in front, per
  strategy (mask_padding, the default; remove_tokens; opposite_guidance);
- explanation: the Token Contributions node alone (its default, leave-one-out re-encoded, one explained step),
  against the same plain generation.
--long: plain and the explanation only, with also a 57-word prompt (64 tokens) explained by the default (screened
leave-one-out: the 12 words a first-order estimate ranks first) and by exact leave-one-out.
Prints seconds and ratios.
"""
import argparse

import torch

from comfyui_host import load_comfy
from side_by_side import interleaved_medians, print_ratios

PROMPT = "a purple ring, lighthouse poster"
LONG_PROMPT = (PROMPT + ", a small red house on a green hill under a pale blue sky, two white clouds drifting over a "
               "quiet harbor with wooden boats, a lighthouse beside old stone walls, seagulls above calm water at "
               "dusk, warm light on the windows, a narrow path leading down to the beach with tall grass")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="plain and explanation only, with a 57-word prompt too")
    args = ap.parse_args()
    load_comfy()
    import comfy.sample
    import comfy.sd
    from comfy_api.latest import io
    from nodes import CLIPTextEncode  # ComfyUI's own
    from memoguard_pack.nodes.nodes_mitigation import EmbeddingMinimization
    from memoguard_pack.nodes.nodes_text_encode import MemoGuardTextEncode
    from memoguard_pack.nodes.nodes_tokens import TokenContributionsNode

    with torch.inference_mode():  # as ComfyUI executes nodes
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False,
                                                                  output_clip=True)
        latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        negative = CLIPTextEncode().encode(clip, "")[0]
        plain_positive = CLIPTextEncode().encode(clip, PROMPT)[0]
        sourced = MemoGuardTextEncode.execute(PROMPT, clip).result[0]
        hidden = {io.Hidden.unique_id: "1"}
        mitigation = EmbeddingMinimization.PREPARE_CLASS_CLONE(hidden)
        tokens = TokenContributionsNode.PREPARE_CLASS_CLONE(hidden)

        def generate(m, positive):
            return comfy.sample.sample(m, noise, args.steps, 7.5, "euler", "normal", positive, negative, latent,
                                       disable_pbar=True, seed=0)

        runs = {"plain": lambda: generate(model, plain_positive)}
        for strategy in () if args.long else ("mask_padding", "remove_tokens", "opposite_guidance"):
            patched = mitigation.execute(model, "always", 0.0, 0.05, 10, "none", "(none)", 0.01, 0.0, strategy).result[0]
            runs[f"mitigation {strategy}"] = lambda m=patched: generate(m, sourced)
        runs["explanation (Token Contributions)"] = lambda: tokens.execute(
            model, clip, PROMPT, {"samples": latent}, 0, args.steps, 1, 7.5, "normal", 1, calibration="none").result
        if args.long:
            for method in ("auto", "leave_one_out"):
                runs[f"explanation, 57 words, {method}"] = lambda m=method: tokens.execute(
                    model, clip, LONG_PROMPT, {"samples": latent}, 0, args.steps, 1, 7.5, "normal", 1, m,
                    calibration="none").result
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        medians = interleaved_medians(runs, args.repeats, sync)
    print(f"{args.checkpoint}: {args.size}x{args.size}, {args.steps} Euler steps, cfg 7.5, one image, "
          f"{args.repeats} repeats; device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print_ratios(medians, 36)


if __name__ == "__main__":
    main()
