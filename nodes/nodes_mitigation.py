"""Embedding Minimization (MODEL -> MODEL): steer the prompt away from a memorized image."""
from comfy_api.latest import io

from .calibration_choice import CHOICES, TOOLTIP as CALIBRATION_TOOLTIP, CalibrationSource
from .mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation
from memoguard.mitigate import MODES


class EmbeddingMinimization(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardEmbeddingMinimization",
            display_name="Embedding Minimization",
            category="MemoGuard",
            description="At the sampler's first step, on its own starting noise, nudges the prompt embedding "
                        "(AdamW) until the memorization score drops; every step then uses the new embedding. "
                        "SD1.x, SD2.x and SDXL; on SD3/Flux it says so and leaves the prompt unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model your sampler uses."),
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="'always' minimizes every prompt, 'auto' only prompts whose first-step "
                                       "score is at or above the threshold, 'off' does nothing."),
                io.Float.Input("target", default=0.0, min=0.0, max=100.0, step=0.001,
                               tooltip="Stop once the first-step score is at or below this (0 = run max_iters)."),
                io.Float.Input("learning_rate", default=0.05, min=0.0001, max=1.0, step=0.001,
                               tooltip="AdamW step size on the embedding (the paper: 0.05)."),
                io.Int.Input("max_iters", default=10, min=1, max=200,
                             tooltip="Most optimizer steps; each costs a forward and backward pass."),
                io.Combo.Input("calibration", options=list(CHOICES), default=CHOICES[0],
                               tooltip="For 'auto': " + CALIBRATION_TOOLTIP),
                io.String.Input("calibration_file", default="", tooltip="Calibration JSON for 'file' (only its "
                                "entry for the loaded weights is used)."),
                io.Float.Input("false_positive_rate", default=0.01, min=0.0001, max=0.5, step=0.001,
                               tooltip="For 'auto': the threshold lets this share of benign prompts through."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1000.0, step=0.001,
                               tooltip="For 'auto': minimize at or above this score; 0 = from the calibration."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with minimization at the first step.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, mode, target, learning_rate, max_iters, calibration, calibration_file,
                false_positive_rate, threshold) -> io.NodeOutput:
        # the calibration is looked up at the sampler's first step, by the weights it runs
        settings = MitigationSettings(mode, target, learning_rate, max_iters, threshold if threshold > 0 else None,
                                      CalibrationSource(calibration, calibration_file), false_positive_rate)
        return io.NodeOutput(attach_mitigation(model, MitigationSession(settings, cls.hidden.unique_id)))
