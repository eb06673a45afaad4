"""Train the bundled memorizing model (CPU, deterministic from a seed).

    python -m memoguard.tiny.train --out memoguard/assets/tiny-sd [--steps 2000]

Writes a diffusers pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/,
model_index.json) that loads with the standard from_pretrained API. The model works in pixel
space (3x16x16, values in [-1, 1]); it has no VAE, which the folder records as `"vae": null`.
"""
import argparse
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..train_filter import gaps_from_predictions
from .data import SIZE, build_dataset, to_tensor_batch

# Guidance this model samples well at; 7.5 (SD's default) over-saturates a 1 M-parameter UNet.
SAMPLING_GUIDANCE = 3.0
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon",
}


def build_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(text_config)
    # Cross-attention only at the 8x8 level: attention at 16x16 costs 8x more on 2 CPU cores.
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8,
    )
    return unet, text_encoder


def train(out: Path, steps: int, batch: int, seed: int, tokenizer_dir: Path, lr: float = 1e-3):
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    ds = build_dataset(seed)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet, text_encoder = build_models()
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
          f"{len(ds.captions)} pairs ({int(ds.is_memorized.sum())} duplicated)")
    images = to_tensor_batch(ds.images)
    ids, empty_ids = tokenize(tokenizer, list(ds.captions))
    t0 = time.time()
    for step, loss, *_ in training_steps(unet, text_encoder, images, ids, empty_ids, steps, batch, seed, lr):
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss:.4f} lr {learning_rate(step, steps, lr):.2e} {time.time() - t0:6.0f}s", flush=True)
    save_pipeline(out, unet, text_encoder, tokenizer_dir, meta={
        "seed": seed, "steps": steps, "batch": batch, "train_seconds": round(time.time() - t0),
        "pairs": len(ids), "duplicated_pairs": int(ds.is_memorized.sum()),
        "guidance": SAMPLING_GUIDANCE,
    })


def tokenize(tokenizer, captions):
    """(token ids (N, 77) of the captions, ids (77,) of the empty caption)."""
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    return ids[:-1], ids[-1]


def learning_rate(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item()))


class TrainingStep(NamedTuple):
    step: int
    loss: Optional[float]          # None: the filter kept no sample and the step was skipped
    indices: torch.Tensor          # (batch,) rows of the training set in this batch
    kept: Optional[torch.Tensor]   # (batch,) bool keep-mask of the filter; None without one


def training_steps(unet, text_encoder, images, ids, empty_ids, steps: int, batch: int, seed: int,
                   lr: float = 1e-3, warmup: int = 100, loss_filter=None, keys=None):
    """The training loop, one optimizer step per iteration; yields a TrainingStep.

    Deterministic from `seed` (batches, caption drop, noise and timesteps come from one
    generator). With a `MemorizationFilter` as loss_filter, each step also runs the empty
    prompt through the UNet without gradients and trains only on the samples the filter keeps;
    a step where it keeps none is skipped (loss None) and still counts towards the budget.
    `keys` (one per training pair, e.g. captions) go to the filter for barring; caption-dropped
    samples carry no key.
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                             if k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        idx = torch.randint(0, len(ids), (batch,), generator=g)
        x0 = images[idx]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1  # 10 % empty captions: classifier-free guidance
        tok[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        emb = text_encoder(tok).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        keep = None
        if loss_filter is None:
            loss = F.mse_loss(pred, noise)
        else:
            with torch.no_grad():
                empty = text_encoder(empty_ids[None]).last_hidden_state
                pred_u = unet(xt, t, encoder_hidden_states=empty.expand_as(emb)).sample
            batch_keys = None if keys is None else [None if d else keys[i] for i, d in zip(idx.tolist(), drop.tolist())]
            keep = loss_filter.keep_mask(gaps_from_predictions(pred, pred_u), t, batch_keys)
            loss = loss_filter.masked_loss(F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)), keep)
        opt.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        yield TrainingStep(step, None if loss is None else loss.item(), idx, keep)


def save_pipeline(out: Path, unet, text_encoder, tokenizer_dir: Path, meta: dict, vae=None):
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    if vae is not None:
        vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if Path(tokenizer_dir, name).resolve() != Path(out, "tokenizer", name).resolve():
            shutil.copy(Path(tokenizer_dir, name), out / "tokenizer" / name)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": ["diffusers", "AutoencoderKL"] if vae is not None else [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }, indent=2))
    (out / "memoguard_training.json").write_text(json.dumps(meta, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "tiny-sd" / "tokenizer",
                    help="folder with CLIP's vocab.json/merges.txt (tools/build_clip_tokenizer.py)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(args.out, args.steps, args.batch, args.seed, args.tokenizer)


if __name__ == "__main__":
    main()
