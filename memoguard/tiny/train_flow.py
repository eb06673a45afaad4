"""Train the flow evaluation model: an SD3-architecture rectified flow of the outdoor scenes (CPU, from a seed).

    python -m memoguard.tiny.train_flow --out memoguard/assets/tiny-flow

The second evaluation model's data and latent space (outdoor.py, the tiny-ldm VAE, frozen), learned the way SD3 /
SD3.5 learn: diffusers' SD3Transformer2DModel (MMDiT, joint text-image attention, RMS q/k norm) with CLIP-L- and
CLIP-G-shaped text encoders trained from scratch and no T5 (zeros in the pipeline's max_sequence_length positions, as
SD3 without T5), rectified-flow targets (velocity = noise - latent) at logit-normal sigmas, 10 % empty captions for
CFG. Writes a standard StableDiffusion3Pipeline folder, so every MemoGuard method runs on it through the flow path
(memoguard.standalone.diffusers_flow) with outcome labels from the outdoor set.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import outdoor
from .data import to_tensor_batch
from .train import learning_rate, tokenize
from .train_outdoor import encode_latents

SAMPLING_GUIDANCE = 5.0
# the pipeline's max_sequence_length it samples at (its notes say so): SD3 without T5 fills these positions with
# zeros; 16, not the default 256, keeps the joint attention short enough to train in CPU minutes
MAX_SEQUENCE_LENGTH = 16
CLIP_WIDTH = 48     # each CLIP's width; side by side they are the transformer's joint attention width
SHIFT = 3.0         # SD3's FlowMatchEulerDiscreteScheduler shift


def build_models():
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=CLIP_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=outdoor.SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=32, num_attention_heads=3, joint_attention_dim=2 * CLIP_WIDTH,
        caption_projection_dim=96, pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=4, qk_norm="rms_norm")
    return transformer, encoders


def encode_text(encoders, ids: torch.Tensor):
    """What StableDiffusion3Pipeline feeds the transformer for CLIP token rows (B, 77): both CLIPs' penultimate
    hidden states side by side, then T5's positions as zeros; pooled = both CLIPs' projections."""
    outs = [enc(ids, output_hidden_states=True) for enc in encoders]
    clip = torch.cat([o.hidden_states[-2] for o in outs], -1)
    zeros = clip.new_zeros(clip.shape[0], MAX_SEQUENCE_LENGTH, clip.shape[-1])
    return torch.cat([clip, zeros], 1), torch.cat([o.text_embeds for o in outs], -1)


def train(out: Path, steps: int, batch: int, seed: int, vae_dir: Path, tokenizer_dir: Path, lr: float = 1e-3):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer
    torch.manual_seed(seed)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline decodes latents / scaling + shift
    ds = outdoor.build_dataset(seed)
    latents = encode_latents(vae, to_tensor_batch(ds.images))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    transformer, encoders = build_models()
    ids, empty_ids = tokenize(tokenizer, list(ds.captions))
    print(f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M params, "
          f"{len(ids)} pairs ({int(ds.is_memorized.sum())} duplicated)", flush=True)
    params = list(transformer.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        idx = torch.randint(0, len(ids), (batch,), generator=g)
        x0, tok = latents[idx], ids[idx].clone()
        tok[torch.rand(batch, generator=g) < 0.1] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # SD3's logit-normal(0, 1) sigmas
        xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        hidden, pooled = encode_text(encoders, tok)
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=hidden,
                           pooled_projections=pooled).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} {time.time() - t0:6.0f}s", flush=True)
    for m in (transformer, *encoders):
        m.eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out)
    (out / "memoguard_training.json").write_text(json.dumps({
        "seed": seed, "steps": steps, "batch": batch, "train_seconds": round(time.time() - t0), "pairs": len(ids),
        "duplicated_pairs": int(ds.is_memorized.sum()), "guidance": SAMPLING_GUIDANCE, "dataset": "outdoor",
        "vae": "tiny-ldm's, frozen",
        "max_sequence_length": MAX_SEQUENCE_LENGTH}, indent=2))


def main(argv=None):
    assets = Path(__file__).resolve().parents[1] / "assets"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vae", type=Path, default=assets / "tiny-ldm" / "vae", help="the outdoor latent space's VAE")
    ap.add_argument("--tokenizer", type=Path, default=assets / "tiny-sd" / "tokenizer",
                    help="folder with CLIP's vocab.json/merges.txt")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train(args.out, args.steps, args.batch, args.seed, args.vae, args.tokenizer)


if __name__ == "__main__":
    main()
