"""A LoRA on a standalone SD1.x / SD2.x / SDXL model, switchable on and off (the audit scores with and without it).

The file is read with diffusers' own LoRA loaders (`StableDiffusionPipeline.lora_state_dict`: diffusers / peft and
kohya-ss layouts), offline, and attached through peft as one adapter on the UNet and, where the file has them, the
text encoders. `with_lora(model, False)` turns it off for a block; the weights themselves never change.
"""
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelLoadError

ADAPTER = "memoguard_audit"


def load_lora(model, path) -> None:
    """Attach the LoRA file `path` to `model` (a DiffusersModel) as one adapter, on."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"LoRA file not found: {path}")
    import importlib.util
    if importlib.util.find_spec("peft") is None:  # diffusers attaches LoRAs through peft
        raise ModelLoadError("a LoRA needs the peft package: pip install peft")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    loader = StableDiffusionXLPipeline if len(model.text_encoders) == 2 else StableDiffusionPipeline
    try:
        state, alphas = loader.lora_state_dict(str(path))
        loader.load_lora_into_unet(state, alphas, model.unet, adapter_name=ADAPTER)
        for n, encoder in enumerate(model.text_encoders):
            prefix = "text_encoder" if n == 0 else "text_encoder_2"
            if any(k.startswith(prefix + ".") for k in state):
                loader.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=ADAPTER)
    except Exception as e:  # a LoRA of another architecture, a corrupt file ...
        raise ModelLoadError(f"could not apply the LoRA {path.name} to {model.name}: {type(e).__name__}: {e}") from None
    for module in (model.unet, *model.text_encoders):
        module.requires_grad_(False)
    model.lora = path.name
    model.weights_changed()


@contextmanager
def with_lora(model, on: bool):
    """The model's LoRA on or off inside the block (the model's key follows)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for module in (model.unet, *model.text_encoders) for m in module.modules()
              if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ModelLoadError("this model has no LoRA attached")
    for layer in layers:
        layer.enable_adapters(on)
    model.weights_changed()
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.weights_changed()
