"""Which model is this? A fingerprint of the denoiser's weights that every host computes alike.

A calibration is only true for the weights it was measured on, so it is stored under this key
and looked up by it. ComfyUI hands nodes a MODEL without its file name, the WebUI and diffusers
hold the same weights under other parameter names and layouts, and hosts load one file in fp16
or fp32. The key is therefore built from what survives all of that: for every weight tensor its
element count and the signs of up to SAMPLES evenly spaced elements (flat order, so a 1x1 conv
and the equivalent linear layer agree), sorted, then hashed. Signs do not change when fp32
weights are rounded to fp16/bf16; a fine-tune, a merge or a baked-in LoRA flips some of the
hundreds of thousands of sampled signs and so gets a key of its own.
"""
import hashlib
import weakref
from typing import Hashable

import torch

SAMPLES = 256
PREFIX = "unet-"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """'unet-' + 16 hex digits, from the module's floating-point parameters (names and dtypes ignored)."""
    records, signs = [], []
    for p in module.parameters():
        if not p.is_floating_point() or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        n = flat.numel()
        idx = torch.arange(min(n, SAMPLES), device=flat.device) * n // min(n, SAMPLES)
        records.append(n)
        signs.append(flat[idx].float() > 0)  # fp8 weights (Forge Neo, ComfyUI) have no comparison on the CPU
    if not records:
        raise ValueError(f"{type(module).__name__} has no floating-point weights to fingerprint")
    sampled = torch.cat(signs).cpu()  # one transfer for the whole model
    entries, start = [], 0
    for n, s in zip(records, signs):
        bits = sampled[start:start + len(s)]
        start += len(s)
        entries.append(n.to_bytes(8, "little") + bytes(_pack(bits)))
    digest = hashlib.sha256(b"".join(sorted(entries))).hexdigest()
    return PREFIX + digest[:16]


_cached: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> (state, key)


def cached_fingerprint(module: torch.nn.Module, state: Hashable = None) -> str:
    """weights_fingerprint(module), computed again only when `state` changes: the host's own record of what
    could have changed the weights (the checkpoint, the LoRA patches merged into them ...)."""
    cached = _cached.get(module)
    if cached is not None and cached[0] == state:
        return cached[1]
    key = weights_fingerprint(module)
    _cached[module] = (state, key)
    return key


def forget(module: torch.nn.Module = None) -> None:
    """Drop the cached keys (all, or one module's), e.g. after weights were changed in place."""
    if module is None:
        _cached.clear()
    else:
        _cached.pop(module, None)


def _pack(bits: torch.Tensor):
    values = bits.to(torch.uint8).tolist()
    for i in range(0, len(values), 8):
        yield sum(v << k for k, v in enumerate(values[i:i + 8]))
