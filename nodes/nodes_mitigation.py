"""Mitigation (MODEL -> MODEL): steer a generation away from a memorized image.

The node id and name stay "Embedding Minimization" so that saved workflows load; its strategy input
picks delayed guidance (the default: BENCHMARKS.md) or the paper's embedding minimization."""
from comfy_api.latest import io

from memoguard.calibration_lookup import CHOICES

from .calibration_choice import FILE_TOOLTIP, TOOLTIP as CALIBRATION_TOOLTIP, accept_saved_value, file_options, lookup
from .mitigation_hook import STRATEGIES, MitigationSession, MitigationSettings, attach_mitigation
from memoguard.mitigate import DEFAULT_DELAY, MODES


class EmbeddingMinimization(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardEmbeddingMinimization",
            display_name="Embedding Minimization",
            category="MemoGuard",
            description="Steers a generation away from a memorized image. 'guidance_delay' (default) turns text "
                        "guidance off for the first steps of the images that need it: no extra model call. "
                        "'minimize' (the paper's) nudges the prompt embedding with AdamW at the sampler's first "
                        "step, on its own starting noise, until the memorization score drops. SD1.x, SD2.x and "
                        "SDXL; on SD3/Flux minimize says so and leaves the prompt unchanged.",
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
                io.Combo.Input("calibration_file", options=file_options(), tooltip="For 'auto': " + FILE_TOOLTIP),
                io.Float.Input("false_positive_rate", default=0.01, min=0.0001, max=0.5, step=0.001,
                               tooltip="For 'auto': the threshold lets this share of benign prompts through."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1000.0, step=0.001,
                               tooltip="For 'auto': mitigate at or above this score; 0 = from the calibration."),
                io.Combo.Input("strategy", options=list(STRATEGIES), default=STRATEGIES[0],
                               tooltip="guidance_delay: no text guidance for the first steps (strength: delay); "
                                       "minimize: the paper's AdamW on the prompt embedding (strength: target, "
                                       "learning_rate, max_iters)."),
                io.Float.Input("delay", default=DEFAULT_DELAY, min=0.0, max=0.9, step=0.05,
                               tooltip="For guidance_delay: the share of the first steps without text guidance "
                                       "(0.3 of 20 steps = 6 steps). More: less copying, less prompt detail."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with minimization at the first step.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, calibration_file) -> bool:
        return accept_saved_value(calibration_file)

    @classmethod
    def execute(cls, model, mode, target, learning_rate, max_iters, calibration, calibration_file,
                false_positive_rate, threshold, strategy=STRATEGIES[0], delay=DEFAULT_DELAY) -> io.NodeOutput:
        # the calibration is looked up at the sampler's first step, by the weights it runs
        settings = MitigationSettings(mitigation=mode, target=target, lr=learning_rate, max_iters=max_iters,
                                      threshold=threshold if threshold > 0 else None,
                                      calibration=lookup(calibration, calibration_file),
                                      fpr=false_positive_rate, strategy=strategy, delay=delay)
        return io.NodeOutput(attach_mitigation(model, MitigationSession(settings, cls.hidden.unique_id)))
