"""Memorization Monitor overhead inside ComfyUI's sampler: the same sampling with and without it, interleaved.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfyui_overhead.py [--repeats 5] [--steps 10]

Run with ComfyUI's Python. Two models: MemoGuard's tiny loader model (16x16 pixels) and an
SD1.5-size UNet (ComfyUI's SD15 config, random weights) at a 32x32 latent (256x256 pixels).
Prints median seconds per run for each side and their ratio; also checks the outputs are equal.
"""
import argparse
import statistics
import time

import torch

from comfyui_host import load_comfy


def sd15_random():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15({"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
                                          "adm_in_channels": None, "use_temporal_attention": False, "in_channels": 4,
                                          "out_channels": 4, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                                          "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output":
                                          [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
                                          "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
                                          "legacy": False, "num_heads": 8, "num_head_channels": -1})
    model = config.get_model({})
    torch.manual_seed(0)
    with torch.no_grad():  # comfy.ops skips initialisation
        for p in model.diffusion_model.parameters():
            p.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                               comfy.model_management.unet_offload_device())
    cond = [[torch.randn(1, 77, 768), {}]]
    uncond = [[torch.randn(1, 77, 768), {}]]
    return patcher, cond, uncond, torch.zeros(1, 4, 32, 32)


def tiny():
    from memoguard_pack.nodes import tiny_loader
    clip = tiny_loader.load_clip()
    encode = lambda text: [[clip.encode_from_tokens(clip.tokenize(text)), {}]]
    return tiny_loader.load_model(), encode("a purple ring, lighthouse poster"), encode(""), torch.zeros(1, 3, 16, 16)


def timed_run(model, cond, uncond, latent, steps):
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, 0)
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", cond, uncond, latent, disable_pbar=True, seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def compare(name, loaded, steps, repeats):
    from memoguard_pack.nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
    model, cond, uncond, latent = loaded
    session = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
    monitored = attach_monitor(model, session)
    timed_run(model, cond, uncond, latent, 1)  # warm-up: load weights, allocate
    plain_times, monitored_times, equal = [], [], True
    for _ in range(repeats):
        t_off, out_off = timed_run(model, cond, uncond, latent, steps)
        t_on, out_on = timed_run(monitored, cond, uncond, latent, steps)
        plain_times.append(t_off)
        monitored_times.append(t_on)
        equal &= torch.equal(out_off, out_on)
    off, on = statistics.median(plain_times), statistics.median(monitored_times)
    print(f"{name:<28} {steps:>5} {off:>10.3f} {on:>12.3f} {on / off:>8.4f} {str(equal):>10} {len(session.trace):>7}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-sd15", action="store_true")
    args = ap.parse_args()
    load_comfy()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}; median of {args.repeats} interleaved runs")
    print(f"{'model':<28} {'steps':>5} {'off (s)':>10} {'monitor (s)':>12} {'ratio':>8} {'identical':>10} {'scored':>7}")
    compare("tiny loader 16x16", tiny(), args.steps, args.repeats)
    if not args.skip_sd15:
        compare("SD1.5-size random 32x32", sd15_random(), args.steps, args.repeats)


if __name__ == "__main__":
    main()
