"""A full-size SDXL checkpoint through the real ComfyUI: the Monitor, a calibration and Token Contributions, with
their wall time and the process's peak memory (issue 21: SDXL was only ever run at toy size).

Run with ComfyUI's Python and COMFYUI_DIR; CHECKPOINT is a full-size SDXL file (tests/hosts/make_random_checkpoint.py
--family sdxl makes one with random weights). Everything runs as ComfyUI's nodes run it, on this machine's device:
    COMFYUI_DIR=/work/hosts/ComfyUI /work/hosts/comfy-venv/bin/python benchmarks/comfyui_sdxl_full.py \\
        /work/hosts/models/random-sdxl.safetensors --json benchmarks/comfyui_sdxl_full.json
Peak memory is the process's resident maximum after each stage (it only grows): the model as loaded, then what each
stage adds on top.
"""
import argparse
import inspect
import json
import resource
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from comfyui_host import load_comfy

TEXT = "a purple ring, lighthouse poster"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=10, help="benign prompts of the calibration (x 4 seeds)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    load_comfy()
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import folder_paths
    from comfy_api.latest import io
    from memoguard.calibration import default_benign_prompts
    from memoguard_pack.nodes.calibration_choice import lookup, model_key
    from memoguard_pack.nodes.calibration_run import calibrate_loaded
    from memoguard_pack.nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
    from memoguard_pack.nodes.nodes_tokens import TokenContributionsNode

    device = str(comfy.model_management.get_torch_device())
    out = {"checkpoint": a.checkpoint, "size": a.size, "steps": a.steps, "device": device}
    quiet = dict(emit=lambda e, d: None, show=lambda t, n: None)
    with torch.inference_mode():  # as ComfyUI executes nodes
        start = time.perf_counter()
        model, clip = comfy.sd.load_checkpoint_guess_config(
            a.checkpoint, output_vae=False, output_clip=True, embedding_directory=folder_paths.get_folder_paths(
                "embeddings"))[:2]
        out["model"] = type(model.model).__name__
        out["parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
        positive, negative = encode(TEXT), encode("")
        latent = torch.zeros(1, 4, a.size // 8, a.size // 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        sample = lambda m: comfy.sample.sample(m, noise, a.steps, 7.0, "euler", "normal", positive, negative, latent,
                                               disable_pbar=True, seed=0)
        comfy.model_management.load_models_gpu([model])
        out["load"] = {"seconds": time.perf_counter() - start, "peak_gib": peak_gib()}

        start = time.perf_counter()
        plain = sample(model)
        plain_seconds = time.perf_counter() - start
        monitor = MonitorSession(MonitorSettings(), **quiet)
        start = time.perf_counter()
        watched = sample(attach_monitor(model, monitor))
        out["monitor"] = {"bit_identical": bool(torch.equal(plain, watched)), "plain_seconds": plain_seconds,
                          "monitored_seconds": time.perf_counter() - start,
                          "first_step": monitor.trace.per_step()[0].tolist(), "peak_gib": peak_gib()}

        with TemporaryDirectory() as folder:
            sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "normal", a.steps)
            start = time.perf_counter()
            made = calibrate_loaded(model, clip, tuple(latent.shape[1:]), sigmas, default_benign_prompts()[:a.prompts],
                                    folder, cfg=7.0, band_prompts=0, seed=0, batch_size=4, scheduler="normal")
            out["calibration"] = {"seconds": time.perf_counter() - start, "samples": len(made.calibration.scores),
                                  "threshold": made.calibration.threshold(0.01), "summary": made.summary,
                                  "peak_gib": peak_gib()}
            judged = MonitorSession(MonitorSettings(calibration=lookup("auto", folders=[folder])), **quiet)
            sample(attach_monitor(model, judged))
            (verdict,) = judged.final_verdicts()
            out["verdict"] = {"label": verdict.label, "score": verdict.score, "notes": verdict.notes,
                              "key": model_key(model.model)}

        hidden = {io.Hidden.unique_id: "1"}
        takes_v3_data = "v3_data" in inspect.signature(TokenContributionsNode.PREPARE_CLASS_CLONE).parameters
        node = TokenContributionsNode.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if takes_v3_data else hidden)
        start = time.perf_counter()
        _, data = node.execute(model, clip, TEXT, {"samples": latent}, 0, a.steps, 1, 7.0, "normal", 1).result
        tokens = json.loads(data)
        out["token_contributions"] = {"seconds": time.perf_counter() - start, "method": tokens.get("method"),
                                      "tokens": tokens.get("tokens"), "summary": tokens.get("summary"),
                                      "error": tokens.get("error"), "peak_gib": peak_gib()}
    out["ratios"] = {"monitored / plain": out["monitor"]["monitored_seconds"] / plain_seconds,
                     "token contributions / plain": out["token_contributions"]["seconds"] / plain_seconds,
                     "calibration / plain": out["calibration"]["seconds"] / plain_seconds}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
