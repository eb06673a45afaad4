"""Autograd through a host model that runs under torch.inference_mode (ComfyUI, Forge).

Weights loaded under inference mode are inference tensors: even inside inference_mode(False)
autograd refuses to save them for backward. Swapping them for ordinary copies (same values)
is fast and lets explanation and mitigation differentiate with respect to the prompt only.
Host UNets written for inference also update activations in place (Forge's transformer block:
`n = norm(x); ...; x += n`), which invalidates what autograd saved for backward; the saved
activations are therefore copies (weights are never modified during a forward pass: not copied).
"""
from contextlib import contextmanager
from typing import Optional

import torch

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _inference_tensors(module: torch.nn.Module):
    for sub in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(sub, kind).items():
                if t is not None and t.is_inference():
                    yield sub, kind, name, t


def make_parameters_differentiable(module: torch.nn.Module) -> None:
    """Replace inference-tensor parameters and buffers of `module` by ordinary copies (call outside inference mode)."""
    found = list(_inference_tensors(module))
    special = sorted({type(t).__name__ for _, _, _, t in found if type(t) not in PLAIN_TENSOR_TYPES})
    if special:  # a copy would drop the quantization wrapper (GGUF, bitsandbytes ...)
        raise ValueError(f"gradients need plain weights; this model holds {', '.join(special)} (a quantized "
                         "checkpoint?): load an fp16/fp32 checkpoint for token explanation and mitigation")
    for sub, kind, name, t in found:
        getattr(sub, kind)[name] = torch.nn.Parameter(t.clone(), requires_grad=False) if kind == "_parameters" \
            else t.clone()


def _save_copy(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def _saved(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def differentiable(module: torch.nn.Module):
    """Leave the host's inference mode so autograd can run through `module` (forward and backward inside)."""
    with torch.inference_mode(False), torch.autograd.graph.saved_tensors_hooks(_save_copy, _saved):
        make_parameters_differentiable(module)
        yield


def ordinary(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy of a host tensor that autograd accepts (call inside `differentiable`)."""
    return None if t is None else t.detach().clone()
