"""Memorization Monitor (MODEL -> MODEL) and Memorization Score readout."""
import json
import math

from comfy_api.latest import io, ui

from . import live
from memoguard.calibration_lookup import CHOICES

from .calibration_choice import FILE_TOOLTIP, TOOLTIP as CALIBRATION_TOOLTIP, accept_saved_value, file_options, lookup
from .mitigation_hook import session_of as mitigation_of
from .monitor_hook import ACTIONS, MonitorSession, MonitorSettings, attach_monitor, session_of
from .plots import score_plot


class MemorizationMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardMemorizationMonitor",
            display_name="Memorization Monitor",
            category="MemoGuard",
            description="Scores, while KSampler runs, how strongly the prompt pulls the model toward a "
                        "training image (Wen et al., ICLR 2024). Leaves the image bit-identical.",
            inputs=[
                io.Model.Input("model", tooltip="The model your sampler uses."),
                io.Int.Input("window", default=1, min=1, max=1000,
                             tooltip="Steps the verdict averages over, from the first. The paper's detector "
                                     "uses the first step only."),
                io.Combo.Input("calibration", options=list(CHOICES), default=CHOICES[0], tooltip=CALIBRATION_TOOLTIP),
                io.Combo.Input("calibration_file", options=file_options(), tooltip=FILE_TOOLTIP),
                io.Float.Input("false_positive_rate", default=0.01, min=0.0001, max=0.5, step=0.001,
                               tooltip="Share of benign prompts allowed above the threshold."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1000.0, step=0.001,
                               tooltip="Flag at or above this score; 0 = take it from the calibration "
                                       "(no calibration and 0: 'uncalibrated', raw score only)."),
                io.Combo.Input("action", options=list(ACTIONS), default="warn",
                               tooltip="When flagged: 'none' only shows it, 'warn' also logs a warning, "
                                       "'stop' ends the queue item with a message."),
                io.Boolean.Input("force_uncond_at_cfg1", default=False,
                                 tooltip="At cfg 1 ComfyUI skips the unconditional pass; MemoGuard then runs the "
                                         "negative prompt's pass itself at the scored steps only (1 extra model "
                                         "call an image with window 1; the image unchanged). On: ComfyUI runs it "
                                         "at every step instead (2x cost; the image may change in the last bits)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The same model, monitored.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, calibration_file) -> bool:
        return accept_saved_value(calibration_file)

    @classmethod
    def execute(cls, model, window, calibration, calibration_file, false_positive_rate, threshold, action,
                force_uncond_at_cfg1) -> io.NodeOutput:
        source = lookup(calibration, calibration_file)
        settings = MonitorSettings(window=window, calibration=source, fpr=false_positive_rate,
                                   threshold=threshold if threshold > 0 else None, action=action,
                                   force_uncond_at_cfg1=force_uncond_at_cfg1)
        node_id = cls.hidden.unique_id
        note = f"threshold {threshold:g} (set by hand)" if threshold > 0 else source.describe()
        live.show_text(f"MemoGuard: {note}; the verdict comes at step {window}", node_id)
        return io.NodeOutput(attach_monitor(model, MonitorSession(settings, node_id)))


class MemorizationScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemoGuardMemorizationScore",
            display_name="Memorization Score",
            category="MemoGuard",
            description="After sampling: the Monitor's verdict, score and a plot of the score per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model coming out of a Memorization Monitor."),
                io.Latent.Input("samples", tooltip="The sampler's output, so that this node runs after it."),
            ],
            outputs=[
                io.Float.Output(display_name="score", tooltip="Verdict score (RMS of the detail of the "
                                "text's pull, or the calibration's detector; mean over the window; highest image of "
                                "the batch); NaN when unavailable."),
                io.Boolean.Output(display_name="flagged", tooltip="True when any image is at or above the threshold."),
                io.String.Output(display_name="summary", tooltip="The verdict per image, in words."),
                io.Image.Output(display_name="plot", tooltip="Score per step, one line per image, threshold dashed."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        session = session_of(model)
        if session is None:
            raise ValueError("this MODEL has no Memorization Monitor: connect the Monitor's output model "
                             "(the one your sampler used)")
        images = _batch_size(samples)
        verdicts = session.final_verdicts(images)
        lines = [f"image {i}: {v.summary()}" for i, v in enumerate(verdicts)]
        mitigation = mitigation_of(model)
        if mitigation is not None:
            lines.append(f"mitigation: {mitigation.summary()}")
        summary = "\n".join(lines)
        scores = [v.score for v in verdicts if v.available]
        score = max(scores) if scores else math.nan
        data = session.to_dict(images)
        plot = score_plot(session.trace.per_step().tolist(), data["threshold"], lines[0] if lines else "",
                          band=data.get("band"), window=data.get("window"), notes=data.get("notes", ()),
                          labels=[f"image {i + 1}: {v['label']}" for i, v in enumerate(data["verdicts"])])
        preview = ui.PreviewImage(plot, cls=cls).as_dict()
        return io.NodeOutput(score, any(v.flagged for v in verdicts), summary, plot,
                             ui={**preview, "memoguard_trace": [json.dumps(data)], "text": [summary]})


def _batch_size(samples) -> int:
    try:
        return int(samples["samples"].shape[0])
    except Exception:
        return 1
