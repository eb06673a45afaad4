"""MemoGuard Tiny Model Loader: the bundled memorizing model as MODEL, CLIP and VAE."""
from pathlib import Path

from comfy_api.latest import io

from . import tiny_loader
from .calibration_choice import accept_saved_value, calibration_folders

BUNDLED = "(bundled)"


def model_folders() -> dict:
    """Tiny model folders a user may pick: diffusers layouts (model_index.json) inside models/memoguard."""
    found = {}
    for folder in calibration_folders():
        try:
            for sub in sorted(Path(folder).iterdir()):
                if (sub / "model_index.json").is_file() and sub.name not in found:
                    found[sub.name] = sub
        except OSError:
            continue
    return found


class MemoGuardTinyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardTinyModelLoader",
            display_name="MemoGuard Tiny Model Loader",
            category="MemoGuard",
            description="MemoGuard's bundled 16x16 pixel-space model, trained to copy 24 images. Runs on a CPU "
                        "with no download. Use an Empty Latent Image of 128x128 (16x16 pixels here).",
            inputs=[
                io.Combo.Input("folder", options=[BUNDLED, *model_folders()],
                               tooltip="The model bundled with MemoGuard, or a MemoGuard tiny model folder (diffusers "
                                       "layout, e.g. from `python -m memoguard.tiny.train --out DIR`) placed in "
                                       "models/memoguard."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The tiny UNet as a ComfyUI SD1-style model."),
                io.Clip.Output(display_name="CLIP", tooltip="Its 2-layer CLIP text encoder with CLIP's tokenizer."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel-space VAE: decoding just maps [-1, 1] to [0, 1]."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder) -> bool:
        return accept_saved_value(folder)

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        name = folder.strip()
        if name in ("", BUNDLED):  # "": what workflows saved when this was a free-text path
            path = tiny_loader.BUNDLED
        else:
            path = model_folders().get(name)
            if path is None:
                raise tiny_loader.TinyModelError(f"folder {name!r} is not one of the tiny models in models/memoguard: "
                                                 f"models are read only from there; move the folder there and pick "
                                                 f"it by name")
        return io.NodeOutput(tiny_loader.load_model(path), tiny_loader.load_clip(path), tiny_loader.load_vae())
