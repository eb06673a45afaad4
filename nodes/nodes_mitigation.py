"""Mitigation (MODEL -> MODEL): steer a generation away from a memorized image.

The node id stays "MemoGuardEmbeddingMinimization" so that saved workflows load (with the strategy they saved);
its strategy input picks among memoguard.mitigate's strategies, "auto" the best measured one the run's
conditioning allows (BENCHMARKS.md)."""
from comfy_api.latest import io

from memoguard.calibration_lookup import CHOICES

from .calibration_choice import FILE_TOOLTIP, TOOLTIP as CALIBRATION_TOOLTIP, accept_saved_value, file_options, lookup
from .mitigation_hook import STRATEGIES, MitigationSession, MitigationSettings, attach_mitigation
from memoguard.mitigate import DEFAULT_DELAY, DEFAULT_EARLY_SCALE, MODES, OPPOSITE_DELAY


class EmbeddingMinimization(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardEmbeddingMinimization",
            display_name="MemoGuard Mitigation",
            category="MemoGuard",
            description="Steers a generation away from a memorized image. 'auto' (default): padding masking when "
                        "the positive prompt comes from MemoGuard Text Encode (the prompt's padding, copies of its "
                        "end token that drive the recall, zeroed at the first step: one extra model call), else "
                        "opposite guidance (the first steps guided away from the prompt: no extra call). Both are "
                        "the best measured on both evaluation models (BENCHMARKS.md); SD3 masks its CLIP part's padding "
                        "(T5's untouched), and where T5 or an LLM feeds the model alone (Flux, Chroma) auto removes "
                        "words instead. Where a model's positions are not its words the prompt "
                        "strategies say so and leave the prompt unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model your sampler uses."),
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="'always' mitigates every image, 'auto' only images whose first-step "
                                       "score is at or above the threshold, 'off' does nothing."),
                io.Float.Input("target", default=0.0, min=0.0, max=100.0, step=0.001,
                               tooltip="Images at or under this first-step score are left alone; minimize and "
                                       "remove_tokens stop once under it (0 = run max_iters / every removal)."),
                io.Float.Input("learning_rate", default=0.05, min=0.0001, max=1.0, step=0.001,
                               tooltip="AdamW step size on the embedding (the paper: 0.05)."),
                io.Int.Input("max_iters", default=10, min=1, max=200,
                             tooltip="Most optimizer steps; each costs a forward and backward pass."),
                io.Combo.Input("calibration", options=list(CHOICES), default=CHOICES[0],
                               tooltip="For 'auto': " + CALIBRATION_TOOLTIP),
                io.Combo.Input("calibration_file", options=file_options(), tooltip="For 'auto': " + FILE_TOOLTIP),
                io.Float.Input("false_positive_rate", default=0.01, min=0.0001, max=0.5, step=0.001,
                               tooltip="For 'auto': the threshold lets this share of benign prompts through."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1000.0, step=0.001,
                               tooltip="For 'auto': mitigate at or above this score; 0 = from the calibration."),
                io.Combo.Input("strategy", options=list(STRATEGIES), default=STRATEGIES[0],
                               tooltip="auto: mask_padding with MemoGuard Text Encode, else opposite_guidance. "
                                       "mask_padding: the prompt's padding zeroed (needs MemoGuard Text Encode). "
                                       "remove_tokens: the words whose removal ends the recall left out, the "
                                       "prompt re-encoded (needs MemoGuard Text Encode; strength: target). "
                                       "opposite_guidance / guidance_delay: the first steps guided away from the "
                                       "prompt / without it (strength: delay, early_scale). minimize: the "
                                       "paper's AdamW on the prompt embedding (target, learning_rate, max_iters)."),
                io.Float.Input("delay", default=0.0, min=0.0, max=0.9, step=0.05,
                               tooltip=f"For opposite_guidance and guidance_delay: the share of the first steps "
                                       f"steered; 0 = the measured default ({OPPOSITE_DELAY} and {DEFAULT_DELAY}: "
                                       f"of 20 steps, 4 and 6). More: less copying, less prompt detail."),
                io.Float.Input("early_scale", default=DEFAULT_EARLY_SCALE, min=-20.0, max=0.0, step=0.5,
                               optional=True,
                               tooltip="For opposite_guidance: the guidance scale of those steps, below 0 "
                                       "(away from the prompt)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model that mitigates in its sampling runs.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, calibration_file) -> bool:
        return accept_saved_value(calibration_file)

    @classmethod
    def execute(cls, model, mode, target, learning_rate, max_iters, calibration, calibration_file,
                false_positive_rate, threshold, strategy=STRATEGIES[0], delay=0.0,
                early_scale=DEFAULT_EARLY_SCALE) -> io.NodeOutput:
        # the calibration is looked up at the sampler's first step, by the weights it runs
        settings = MitigationSettings(mitigation=mode, target=target, lr=learning_rate, max_iters=max_iters,
                                      threshold=threshold if threshold > 0 else None,
                                      calibration=lookup(calibration, calibration_file),
                                      fpr=false_positive_rate, strategy=strategy, delay=delay if delay > 0 else None,
                                      early_scale=early_scale)
        return io.NodeOutput(attach_mitigation(model, MitigationSession(settings, cls.hidden.unique_id)))
