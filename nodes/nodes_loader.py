"""MemoGuard Tiny Model Loader: the bundled memorizing model as MODEL, CLIP and VAE."""
from comfy_api.latest import io

from . import tiny_loader


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
                io.String.Input("folder", default="", tooltip="A MemoGuard tiny model folder (diffusers layout); "
                                "empty = the model bundled with MemoGuard."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The tiny UNet as a ComfyUI SD1-style model."),
                io.Clip.Output(display_name="CLIP", tooltip="Its 2-layer CLIP text encoder with CLIP's tokenizer."),
                io.Vae.Output(display_name="VAE", tooltip="Pixel-space VAE: decoding just maps [-1, 1] to [0, 1]."),
            ],
        )

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        path = folder.strip() or tiny_loader.BUNDLED
        return io.NodeOutput(tiny_loader.load_model(path), tiny_loader.load_clip(path), tiny_loader.load_vae())
