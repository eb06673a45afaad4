"""The "MemoGuard" entry of the txt2img / img2img Script dropdown.

API (/sdapi/v1/txt2img, /sdapi/v1/img2img): "script_name": "memoguard" and "script_args" in the
order of ARG_NAMES (missing trailing values take the defaults below).
"""
import math

from modules import processing, script_callbacks, scripts, shared

from memoguard.calibration import Calibration, CalibrationError

from .forge import is_forge
from .monitor import ForgeRunMonitor, RunMonitor, Settings
from .panel import image_panel, mitigation_text, panel, top_tokens_text, verdict_label

# (argument, gradio component, label, default, hint, options); script_args follow this order.
CONTROLS = (
    ("window", "Slider", "Score window (steps)", 1,
     "Average the gap over the first N steps; 1 = first step, as in the paper", dict(minimum=1, maximum=50, step=1)),
    ("threshold", "Number", "Threshold", 0.0, "Flag images whose score reaches this value; 0 = use the calibration", {}),
    ("calibration_file", "Textbox", "Calibration file", "",
     "JSON from `python -m memoguard calibrate`; gives percentiles and a threshold", {}),
    ("fpr", "Slider", "False-positive rate", 0.01, "Share of benign prompts the calibrated threshold may flag",
     dict(minimum=0.001, maximum=0.2, step=0.001)),
    ("explain", "Checkbox", "Explain tokens", False,
     "Colour each prompt token by how much it drives the gap (one backward pass per explained step)", {}),
    ("explain_steps", "Slider", "Explanation steps", 1, "Average token contributions over the first N sampling steps",
     dict(minimum=1, maximum=10, step=1)),
    ("mitigation", "Radio", "Mitigation", "off",
     "Optimise the prompt embedding before sampling; auto = only when flagged. Off keeps images bit-identical",
     dict(choices=["off", "always", "auto"])),
    ("target", "Number", "Target score", 0.0, "Stop optimising an image once its first-step score is at or under this", {}),
    ("lr", "Number", "Learning rate", 0.05, "AdamW step size (paper: 0.05)", {}),
    ("max_iters", "Slider", "Max iterations", 10, "AdamW iterations at most (paper: 10)", dict(minimum=0, maximum=50, step=1)),
)
ROWS = ((0, 1), (2, 3), (4, 5), (6, 7, 8, 9))
ARG_NAMES = tuple(c[0] for c in CONTROLS)
DEFAULTS = tuple(c[3] for c in CONTROLS)


def settings_from_args(args, checkpoint_name: str) -> Settings:
    values = dict(zip(ARG_NAMES, DEFAULTS))
    values.update(zip(ARG_NAMES, args))
    calibration = None
    path = str(values["calibration_file"] or "").strip()
    if path:
        try:
            calibration = Calibration.load(path)
        except CalibrationError:  # a file with several models: take this checkpoint's entry
            calibration = Calibration.load(path, checkpoint_name)
    threshold = float(values["threshold"] or 0.0)
    return Settings(window=int(values["window"]), threshold=threshold if threshold > 0 else None,
                    calibration=calibration, fpr=float(values["fpr"]), explain=bool(values["explain"]),
                    explain_steps=int(values["explain_steps"]), mitigation=str(values["mitigation"]),
                    target=float(values["target"]), lr=float(values["lr"]), max_iters=int(values["max_iters"]))


class MemoGuardScript(scripts.Script):
    panel_html = ""   # the last generation's panel, shown when the output panel updates
    last_run = None   # the last generation's RunMonitor

    def title(self):
        return "MemoGuard"

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        import gradio as gr
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Group(elem_id=f"memoguard_{tab}"):
            controls = []
            for row in ROWS:
                with gr.Row():
                    for name, component, label, default, hint, options in (CONTROLS[i] for i in row):
                        controls.append(getattr(gr, component)(value=default, label=label, info=hint,
                                                               elem_id=f"memoguard_{name}_{tab}", **options))
            self.panel = gr.HTML(elem_id=f"memoguard_panel_{tab}")
        return controls

    def after_component(self, component, **kwargs):
        # The hidden generation-info textbox changes once per finished generation: refresh the panel then.
        tab = "img2img" if self.is_img2img else "txt2img"
        if kwargs.get("elem_id") == f"generation_info_{tab}" and getattr(self, "panel", None) is not None:
            component.change(fn=lambda: self.panel_html, inputs=[], outputs=[self.panel], show_progress=False)

    def run(self, p, *args):
        checkpoint = getattr(getattr(p.sd_model, "sd_checkpoint_info", None), "model_name", "")
        try:
            settings = settings_from_args(args, checkpoint)
        except (ValueError, TypeError) as e:  # CalibrationError is a ValueError
            p.comment(f"MemoGuard is off for this generation: {e}")
            return processing.process_images(p)
        monitor = (ForgeRunMonitor if is_forge() else RunMonitor)(p, settings, shared.state)
        self._add_infotext(p, monitor)
        script_callbacks.on_cfg_denoiser(monitor.on_cfg_denoiser)
        script_callbacks.on_cfg_denoised(monitor.on_cfg_denoised)  # never fired by Forge: harmless there
        try:
            processed = processing.process_images(p)
        finally:
            script_callbacks.remove_callbacks_for_function(monitor.on_cfg_denoiser)
            script_callbacks.remove_callbacks_for_function(monitor.on_cfg_denoised)
        self.last_run = monitor
        self.panel_html = self._panel(p, monitor)
        processed.comments += "".join(f"{line}\n" for line in self._summary(p, monitor))
        return processed

    @staticmethod
    def _add_infotext(p, monitor: RunMonitor) -> None:
        """Values are computed when each image's infotext is written, after its sampling."""
        def score(iteration=0, position_in_batch=0, **_):
            v = monitor.verdict(iteration, position_in_batch)
            return f"{v.score:.4f}" if v.available else None

        p.extra_generation_params["MemoGuard score"] = score
        p.extra_generation_params["MemoGuard verdict"] = \
            lambda iteration=0, position_in_batch=0, **_: verdict_label(monitor.verdict(iteration, position_in_batch))
        # the API's info and PNG info carry no processed.comments: the note on the hires pass goes here too
        p.extra_generation_params["MemoGuard hires pass"] = lambda **_: "not scored" if monitor.hires_seen else None
        s = monitor.settings
        if s.calibration is not None:
            def percentile(iteration=0, position_in_batch=0, **_):
                v = monitor.verdict(iteration, position_in_batch)
                return f"{v.percentile:.1f}" if v.available and math.isfinite(v.percentile) else None
            p.extra_generation_params["MemoGuard percentile"] = percentile
        if s.mitigation != "off":
            p.extra_generation_params["MemoGuard mitigation"] = lambda iteration=0, position_in_batch=0, **_: \
                mitigation_text(_mitigation(monitor, iteration), position_in_batch)
        if s.explain:
            p.extra_generation_params["MemoGuard tokens"] = lambda iteration=0, position_in_batch=0, **_: \
                top_tokens_text(monitor.image_explanations(iteration, position_in_batch))

    @staticmethod
    def _images(p):
        for iteration in range(int(getattr(p, "n_iter", 1))):
            for position in range(int(p.batch_size)):
                yield iteration, position

    def _panel(self, p, monitor: RunMonitor) -> str:
        parts = []
        for iteration, position in self._images(p):
            result = monitor.results.get(iteration)
            gaps = result.trace.per_step()[:, position].tolist() if result is not None and len(result.trace) else []
            parts.append(image_panel(f"Image {iteration * p.batch_size + position + 1}",
                                     monitor.verdict(iteration, position), gaps,
                                     monitor.image_explanations(iteration, position),
                                     mitigation_text(_mitigation(monitor, iteration), position)))
        return panel(parts, monitor.errors, self._notes(monitor))

    def _summary(self, p, monitor: RunMonitor):
        for iteration, position in self._images(p):
            yield f"MemoGuard image {iteration * p.batch_size + position + 1}: " \
                  f"{monitor.verdict(iteration, position).summary()}"
        yield from monitor.errors
        yield from self._notes(monitor)

    @staticmethod
    def _notes(monitor: RunMonitor):
        if monitor.hires_seen:
            yield "MemoGuard scores the first pass only; the hires-fix pass is not scored."


def _mitigation(monitor: RunMonitor, iteration: int):
    result = monitor.results.get(iteration)
    return result.mitigation if result is not None else None
