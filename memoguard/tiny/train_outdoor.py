"""Train the second evaluation model: a latent diffusion model of outdoor scenes (CPU, from a seed).

    python -m memoguard.tiny.train_outdoor --out memoguard/assets/tiny-ldm

First a VAE (32x32x3 pixels <-> 8x8x4 latents, SD's 4 latent channels) on renders that are not the
training set, with SD's recipe reduced to what a CPU affords (L1 + MSE reconstruction, a small KL
term, the latents scaled to unit variance); then the UNet and a CLIP text encoder from scratch
on the scaled latents of the training set (outdoor.py), with the bundled model's training loop.
Writes a standard diffusers StableDiffusionPipeline folder, VAE included.
"""
import argparse
import time
from pathlib import Path

import torch

from . import outdoor
from .data import to_tensor_batch
from .train import learning_rate, save_pipeline, tokenize, training_steps

SAMPLING_GUIDANCE = 5.0


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=outdoor.SIZE)


def build_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=outdoor.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8)
    return unet, text_encoder


def train_vae(vae, steps: int, batch: int, seed: int, lr: float = 1e-3, kl_weight: float = 1e-4, log=print):
    images = to_tensor_batch(outdoor.autoencoder_images(4000, seed=seed + 7))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + kl_weight * posterior.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step:5d} loss {loss.item():.4f} {time.time() - t0:6.0f}s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(images[:512]).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1 / z.std()))
        rmse = (vae.decode(z).sample - images[:512]).square().mean().sqrt().item() / 2
    log(f"vae scaling factor {vae.config.scaling_factor:.4f}, reconstruction RMSE {rmse:.4f} (pixels in [0, 1])")
    return rmse


def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean
                          for i in range(0, len(images), batch)]) * vae.config.scaling_factor


def train(out: Path, steps: int, vae_steps: int, batch: int, seed: int, tokenizer_dir: Path, lr: float = 1e-3):
    from transformers import CLIPTokenizer
    torch.manual_seed(seed)
    t0 = time.time()
    vae = build_vae()
    vae_rmse = train_vae(vae, vae_steps, 32, seed)
    ds = outdoor.build_dataset(seed)
    latents = encode_latents(vae, to_tensor_batch(ds.images))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet, text_encoder = build_models()
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
          f"{len(ds.captions)} pairs ({int(ds.is_memorized.sum())} duplicated)")
    ids, empty_ids = tokenize(tokenizer, list(ds.captions))
    for step, loss, *_ in training_steps(unet, text_encoder, latents, ids, empty_ids, steps, batch, seed, lr):
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss:.4f} {time.time() - t0:6.0f}s", flush=True)
    save_pipeline(out, unet, text_encoder, tokenizer_dir, vae=vae, meta={
        "seed": seed, "steps": steps, "vae_steps": vae_steps, "batch": batch,
        "train_seconds": round(time.time() - t0), "pairs": len(ids),
        "duplicated_pairs": int(ds.is_memorized.sum()), "guidance": SAMPLING_GUIDANCE,
        "vae_reconstruction_rmse": round(vae_rmse, 4), "dataset": "outdoor"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path,
                    default=Path(__file__).resolve().parents[1] / "assets" / "tiny-sd" / "tokenizer",
                    help="folder with CLIP's vocab.json/merges.txt (tools/build_clip_tokenizer.py)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train(args.out, args.steps, args.vae_steps, args.batch, args.seed, args.tokenizer)


if __name__ == "__main__":
    main()
