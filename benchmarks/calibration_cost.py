"""What calibrating a model costs, side by side with the UNet work it cannot avoid (issue 9).

    .venv/bin/python benchmarks/calibration_cost.py --json benchmarks/calibration_cost.json

For each model (the bundled one, and a random-weight SD1.5-size UNet + CLIP ViT-L text encoder at a
reduced latent size so that it runs on 2 CPU cores), in one run:
- verdict: `memoguard.measure.calibrate(..., band_prompts=0)` over N prompts, against the CFG pairs of the same
  prompts (raw batched cond+uncond UNet forwards on the same inputs); also the UNet images evaluated per prompt;
- band: `memoguard.measure.band_gaps` (a monitored guided run per prompt) against plain guided sampling of
  the same prompts with the monitor off.
Ratios are medians of interleaved repeats.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from memoguard.standalone.diffusers_model import BUNDLED_MODEL, DiffusersModel, load_model
from memoguard.measure import band_gaps, calibrate
from memoguard.sampling import initial_noise, sample


def sd15_size_model(latent: int) -> DiffusersModel:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768)  # SD1.5's blocks, 860 M parameters
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    for m in (unet, text):
        m.eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_MODEL / "tokenizer")
    return DiffusersModel(unet, [text], [tokenizer], scheduler, name="random-sd15-size")


class CountingModel:
    """Counts the images the UNet evaluates through raw_prediction."""

    def __init__(self, model):
        self.model, self.images = model, 0
        self._raw = model.raw_prediction
        model.raw_prediction = self._counted

    def _counted(self, x, t, embedding, extra):
        self.images += x.shape[0]
        return self._raw(x, t, embedding, extra)


def raw_forwards(model, prompts, shape, steps, batch_size):
    """The CFG pairs of the verdict done by hand (one cond+uncond batch per chunk of prompts): what it cost
    before the unconditional half was shared (memoguard.measure.FirstStep)."""
    uncond = model.encode([""])
    t = model.timesteps(steps)[0]
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            cond = model.encode(chunk)
            x = initial_noise(model, shape, range(len(chunk)))
            emb = torch.cat([cond.embedding, uncond.embedding.expand(len(chunk), -1, -1)])
            model.unet(torch.cat([x, x]), t, encoder_hidden_states=emb)


def measure(model, prompts, band_prompts, steps, batch_size, repeats):
    shape = model.latent_shape()
    counter = CountingModel(model)
    verdict, raw, band, plain = [], [], [], []
    for _ in range(repeats):
        counter.images = 0
        t0 = time.perf_counter()
        calibrate(model, prompts, model_key="bench", shape=shape, steps=steps, band_prompts=0, batch_size=batch_size)
        verdict.append(time.perf_counter() - t0)
        per_prompt = counter.images / len(prompts)
        t0 = time.perf_counter()
        raw_forwards(model, prompts, shape, steps, batch_size)
        raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        band_gaps(model, band_prompts, 0, shape, steps, model.guidance, batch_size=len(band_prompts))
        band.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            cond, uncond = model.encode(band_prompts), model.encode([""])
            sample(model, cond, uncond, initial_noise(model, shape, range(len(band_prompts))), steps, monitor=False)
        plain.append(time.perf_counter() - t0)
    med = statistics.median
    return {"model": model.name, "latent": list(shape), "prompts": len(prompts), "band_prompts": len(band_prompts),
            "steps": steps, "batch_size": batch_size, "repeats": repeats,
            "unet_images_per_prompt_verdict": per_prompt,
            "verdict_s": med(verdict), "raw_forwards_s": med(raw), "verdict_ratio": med(verdict) / med(raw),
            "band_s": med(band), "plain_sampling_s": med(plain), "band_ratio": med(band) / med(plain),
            "band_s_per_prompt": med(band) / len(band_prompts)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--sd-latent", type=int, default=32, help="latent size of the SD1.5-size model (64 = 512 px)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from memoguard.tiny.evalsets import eval_set
    tiny_prompts = eval_set("shapes").benign_prompts()
    results = [measure(load_model(), tiny_prompts[:256], tiny_prompts[:16], 20, 64, args.repeats),
               measure(sd15_size_model(args.sd_latent), tiny_prompts[:12], tiny_prompts[:2], 10, 4, args.repeats)]
    for r in results:
        print(f"{r['model']}: verdict {r['verdict_s']:.2f} s vs raw forwards {r['raw_forwards_s']:.2f} s "
              f"(ratio {r['verdict_ratio']:.3f}, {r['unet_images_per_prompt_verdict']:.2f} UNet images per prompt); "
              f"band {r['band_s']:.2f} s vs plain sampling {r['plain_sampling_s']:.2f} s (ratio {r['band_ratio']:.3f})")
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
