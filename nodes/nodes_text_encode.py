"""MemoGuard Text Encode: CLIP Text Encode whose CONDITIONING also carries the prompt's text and CLIP, so that
the mitigation node can find the prompt's padding (padding masking) and re-encode it without words (token
removal). Wired where CLIP Text Encode was, it encodes exactly as CLIP Text Encode does."""
from comfy_api.latest import io

from .comfy_model import with_prompt_source


class MemoGuardTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardTextEncode",
            display_name="MemoGuard Text Encode",
            category="MemoGuard",
            description="Encodes a prompt like CLIP Text Encode (Prompt), and lets MemoGuard's mitigation see "
                        "the prompt: use it for the positive prompt of a sampler whose MODEL goes through "
                        "MemoGuard Mitigation, so that padding masking and token removal can run.",
            inputs=[
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt, with ComfyUI's weights syntax and embeddings."),
                io.Clip.Input("clip", tooltip="The text encoder that goes with the model."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt's conditioning, carrying its text for MemoGuard.")],
        )

    @classmethod
    def execute(cls, text, clip) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("MemoGuard Text Encode: the clip input is empty (a checkpoint without a text "
                               "encoder?): connect a CLIP")
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return io.NodeOutput(with_prompt_source(conditioning, text, clip))
