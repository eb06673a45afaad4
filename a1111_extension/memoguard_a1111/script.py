"""MemoGuard in the txt2img / img2img tabs: the "MemoGuard" entry of the Script dropdown, and the same
controls in an always-visible "MemoGuard Monitor" accordion that runs beside X/Y/Z plot or any other script.

API (/sdapi/v1/txt2img, /sdapi/v1/img2img): "script_name": "memoguard" and "script_args" in the
order of ARG_NAMES (missing trailing values take the defaults below), or
"alwayson_scripts": {"memoguard monitor": {"args": [true, ...the same script_args]}}. Calibration:
POST /memoguard/v1/calibrate (api.py; with --api, behind --api-auth), or the "Calibrate this checkpoint" button.
"""
import hashlib
import json
import math
import sys
from collections import OrderedDict
from typing import Optional

from memoguard.calibration_lookup import NO_FILE
from memoguard.mitigate import DEFAULT_DELAY, DEFAULT_EARLY_SCALE, DEFAULT_STRATEGY, OPPOSITE_DELAY
from modules import processing, script_callbacks, scripts, shared

from . import api, calibrate as calibration_glue, evidence
from .args import STRATEGIES, parse_args
from .forge import is_forge
from .monitor import ForgeRunMonitor, RunMonitor, Settings
from .panel import Chart, explanation_method, image_panel, mitigation_text, panel, top_tokens_text

# (argument, gradio component, label, default, hint, options); script_args follow this order.
CONTROLS = (
    ("window", "Slider", "Score window (steps)", 1,
     "Average the gap over the first N steps; 1 = first step, as in the paper", dict(minimum=1, maximum=50, step=1)),
    ("threshold", "Number", "Threshold", 0.0, "Flag images whose score reaches this value; 0 = use the calibration", {}),
    ("calibration_file", "Dropdown", "Calibration file", NO_FILE,
     "(none): the calibration of this checkpoint from models/memoguard (found by model key). A file of "
     "models/memoguard: that one, which must be for this checkpoint", {}),
    ("fpr", "Slider", "False-positive rate", 0.01, "Share of benign prompts the calibrated threshold may flag",
     dict(minimum=0.001, maximum=0.2, step=0.001)),
    ("explain", "Checkbox", "Explain tokens", False,
     "Colour each word of the prompt by how much it drives the gap (by default: the prompt encoded again without "
     "each word, one model call a word per explained step)", {}),
    ("explain_steps", "Slider", "Explanation steps", 1, "Average token contributions over the first N sampling steps",
     dict(minimum=1, maximum=10, step=1)),
    ("mitigation", "Radio", "Mitigation", "off",
     "Steer away from a memorized image; auto = only images flagged at the first step. Off keeps images "
     "bit-identical", dict(choices=["off", "always", "auto"])),
    ("target", "Number", "Target score", 0.0, "Leave an image alone once its first-step score is at or under this", {}),
    ("lr", "Number", "Learning rate", 0.05, "Minimize: AdamW step size (paper: 0.05)", {}),
    ("max_iters", "Slider", "Max iterations", 10, "Minimize: AdamW iterations at most (paper: 10)",
     dict(minimum=0, maximum=50, step=1)),
    ("strategy", "Radio", "Mitigation strategy", DEFAULT_STRATEGY,
     "mask_padding (the best measured, BENCHMARKS.md): the prompt's padding, copies of its end token that drive "
     "the recall, zeroed at the first step (one extra model call). opposite_guidance / guidance_delay: the first "
     "steps guided away from the prompt / without it (no extra call). remove_tokens: up to 3 words left out, "
     "the prompt encoded again by the WebUI (fewest copies, most change; the infotext names the words). minimize: "
     "the paper's AdamW on the prompt embedding",
     dict(choices=list(STRATEGIES))),
    ("delay", "Slider", "Guidance delay", 0.0,
     f"Opposite guidance / guidance delay: share of the first steps steered; 0 = the measured default "
     f"({OPPOSITE_DELAY} / {DEFAULT_DELAY}). More: less copying, less prompt detail",
     dict(minimum=0.0, maximum=0.9, step=0.05)),
    ("explain_method", "Dropdown", "Explanation method", "auto",
     "auto = leave-one-out: the prompt encoded again without each word (one forward per word; over 12 words "
     "on the 12 a first-order estimate ranks first: a backward, 14 forwards), gradient x input where the prompt "
     "cannot be encoded again (the panel says why); leave_one_out_grouped: by groups, no backward pass; gradient_x_delta: "
     "one backward pass; integrated_gradients: 4; gradient_norm: the paper's. The infotext names the one used",
     dict(choices=["auto", "leave_one_out", "leave_one_out_screened", "leave_one_out_grouped", "gradient_x_delta",
                   "integrated_gradients", "gradient_norm"])),
    ("early_scale", "Slider", "Opposite guidance scale", DEFAULT_EARLY_SCALE,
     "Opposite guidance: the guidance scale of its first steps, below 0 (away from the prompt)",
     dict(minimum=-10.0, maximum=0.0, step=0.5)),
    ("training_images", "Dropdown", "Copy evidence: training images", evidence.NO_FOLDER,
     "A dataset folder in models/memoguard_training (images, .txt captions): each image beside its nearest "
     "training image, with the copy verdict, in the panel and the infotext (the MemoGuard Monitor accordion; "
     "indexed on first use, cached in models/memoguard/indexes)", {}),
)
ROWS = ((0, 1), (2, 3), (4, 5, 12), (6, 10), (11, 13), (7, 8, 9), (14,))
ARG_NAMES = tuple(c[0] for c in CONTROLS)
DEFAULTS = tuple(c[3] for c in CONTROLS)


def settings_from_args(args) -> Settings:
    """Settings from script_args (UI or API), every value type- and range-checked (args.ArgumentError)."""
    v = parse_args(args, ARG_NAMES, DEFAULTS)
    return Settings(window=v["window"], threshold=v["threshold"] if v["threshold"] > 0 else None,
                    calibration_file=v["calibration_file"], fpr=v["fpr"], explain=v["explain"],
                    explain_steps=v["explain_steps"], mitigation=v["mitigation"], target=v["target"], lr=v["lr"],
                    max_iters=v["max_iters"], strategy=v["strategy"], delay=v["delay"] if v["delay"] > 0 else None,
                    explain_method=v["explain_method"], early_scale=v["early_scale"],
                    training_images="" if v["training_images"] == evidence.NO_FOLDER else v["training_images"])


def image_of(kwargs) -> tuple:
    """(iteration, position in batch) of the image whose infotext the WebUI is writing.

    create_infotext hands callables its locals. For each saved image the WebUI calls it with the
    current batch's prompt list and index = position in that batch, leaving iteration and
    position_in_batch at 0 (p.iteration is the batch being written); Processed.infotext passes
    iteration and position_in_batch, and index is then the image's number in the whole job.
    """
    p = kwargs.get("p")
    batch = max(1, int(getattr(p, "batch_size", 1) or 1))
    if kwargs.get("use_main_prompt"):
        return 0, 0
    index = kwargs.get("index")
    if index is None:
        return int(kwargs.get("iteration") or 0), int(kwargs.get("position_in_batch") or 0)
    index = int(index)
    if p is not None and kwargs.get("all_prompts") is getattr(p, "prompts", None):  # the current batch's list
        return int(getattr(p, "iteration", 0) or 0), index
    return divmod(index, batch)


# Panels of recent runs, found again by what the WebUI's generation info says about the run (per session):
# two tabs or users never see each other's panel.
PANELS_KEPT = 64
_panels: "OrderedDict[str, str]" = OrderedDict()


def panel_key(job_timestamp, all_seeds, all_prompts, infotexts) -> str:
    blob = json.dumps([str(job_timestamp), list(all_seeds or []), list(all_prompts or []), list(infotexts or [])],
                      default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def remember_panel(processed, html_text: str) -> str:
    key = panel_key(getattr(processed, "job_timestamp", ""), getattr(processed, "all_seeds", []),
                    getattr(processed, "all_prompts", []), getattr(processed, "infotexts", []))
    _panels[key] = html_text
    _panels.move_to_end(key)
    while len(_panels) > PANELS_KEPT:
        _panels.popitem(last=False)
    return key


def panel_for(generation_info: str) -> str:
    """The panel of the run this generation-info JSON (Processed.js()) describes; empty for other runs."""
    try:
        info = json.loads(generation_info or "{}")
    except (TypeError, ValueError):
        return ""
    if not isinstance(info, dict):
        return ""
    return _panels.get(panel_key(info.get("job_timestamp", ""), info.get("all_seeds", []),
                                 info.get("all_prompts", []), info.get("infotexts", [])), "")


CALIBRATION_CONTROLS = (
    ("prompts", "Slider", "Benign prompts", calibration_glue.DEFAULTS["prompts"],
     "How many of the shipped benign prompts to score (1 UNet evaluation each, batched)",
     dict(minimum=10, maximum=500, step=1)),
    ("band_prompts", "Slider", "Band runs", calibration_glue.DEFAULTS["band_prompts"],
     "Full sampling runs for the per-step band in the plot (2 x steps evaluations each); 0 = no band",
     dict(minimum=0, maximum=64, step=1)),
    ("steps", "Slider", "Steps", calibration_glue.DEFAULTS["steps"],
     "Steps of the band's runs (Euler, Automatic schedule); the verdict uses the first step",
     dict(minimum=2, maximum=150, step=1)),
    ("width", "Slider", "Width", calibration_glue.DEFAULTS["width"], "Image width the calibration samples at",
     dict(minimum=64, maximum=2048, step=64)),
    ("height", "Slider", "Height", calibration_glue.DEFAULTS["height"], "Image height the calibration samples at",
     dict(minimum=64, maximum=2048, step=64)),
)


RUN_ATTR = "memoguard"  # p.memoguard: this generation's RunMonitor (dies with p; never on the script)


def remove_leftover_callbacks() -> None:
    """The CFG callbacks of an earlier run whose generation raised before its postprocess (the WebUI runs one
    generation at a time, so any RunMonitor still registered belongs to a finished run)."""
    for entries in list(script_callbacks.callback_map.values()):
        for entry in list(entries):
            function = getattr(entry, "callback", entry)  # the WebUI keeps (script, callback) pairs
            if isinstance(getattr(function, "__self__", None), RunMonitor):
                script_callbacks.remove_callbacks_for_function(function)


class MemoGuardBase(scripts.Script):
    """What the dropdown entry and the always-visible accordion share: the controls, starting MemoGuard for
    one processing object and finishing it with the Processed it returned. All per-run state lives on p."""

    id_prefix = "memoguard"

    def title(self):
        return "MemoGuard"

    def show(self, is_img2img):
        return True

    def _controls(self, tab: str):
        import gradio as gr
        made = {}
        for row in ROWS:
            with gr.Row():
                for name, component, label, default, hint, options in (CONTROLS[i] for i in row):
                    if name == "calibration_file":  # the files there now (a new one shows after a UI reload)
                        options = dict(choices=calibration_glue.file_options())
                    elif name == "training_images":  # the dataset folders there now
                        options = dict(choices=evidence.folder_options())
                    made[name] = getattr(gr, component)(value=default, label=label, info=hint,
                                                        elem_id=f"{self.id_prefix}_{name}_{tab}", **options)
        with gr.Accordion("Calibrate this checkpoint", open=False, elem_id=f"{self.id_prefix}_calibrate_{tab}"):
            # not returned: these are no script_args
            with gr.Row():
                settings = [getattr(gr, component)(value=default, label=label, info=hint,
                                                   elem_id=f"{self.id_prefix}_cal_{name}_{tab}", **options)
                            for name, component, label, default, hint, options in CALIBRATION_CONTROLS]
            button = gr.Button("Calibrate this checkpoint", elem_id=f"{self.id_prefix}_cal_button_{tab}")
            status = gr.HTML(f"<div class='memoguard-note'>Saved to models/memoguard/&lt;model key&gt;.json and "
                             f"used automatically for this checkpoint. API: POST {api.ROUTE}</div>",
                             elem_id=f"{self.id_prefix}_cal_status_{tab}")
            button.click(fn=calibration_glue.ui_calibrate, inputs=settings, outputs=[status])
        self.panel = gr.HTML(elem_id=f"{self.id_prefix}_panel_{tab}")
        return [made[name] for name in ARG_NAMES]  # script_args order, whatever the layout's

    def after_component(self, component, **kwargs):
        # The generation-info textbox of this session changes once per finished generation: show that run's panel.
        tab = "img2img" if self.is_img2img else "txt2img"
        if kwargs.get("elem_id") == f"generation_info_{tab}" and getattr(self, "panel", None) is not None:
            component.change(fn=panel_for, inputs=[component], outputs=[self.panel], show_progress=False)

    def start(self, p, args) -> Optional[RunMonitor]:
        """MemoGuard on for this generation of p (callbacks registered, infotext keys added); None when it
        cannot run (bad script_args: said in the infotext) or already runs for p."""
        if isinstance(getattr(p, RUN_ATTR, None), RunMonitor):
            p.comment("MemoGuard is on both as a script and in its accordion: the script's settings apply")
            return None
        try:
            settings = settings_from_args(args)
        except ValueError as e:  # wrong script_args: said where API users look (infotext / info) and in the log
            message = f"{e}; MemoGuard did not run for this generation"
            print(f"MemoGuard error: {message}", file=sys.stderr)
            p.extra_generation_params["MemoGuard error"] = message
            p.comment(f"MemoGuard error: {message}")
            return None
        remove_leftover_callbacks()
        monitor = (ForgeRunMonitor if is_forge() else RunMonitor)(p, settings, shared.state)
        monitor.entry = self.id_prefix
        if settings.training_images:
            monitor.evidence = evidence.RunEvidence(settings.training_images, lambda: monitor.model_key,
                                                    lambda text: setattr(shared.state, "textinfo", text))
        setattr(p, RUN_ATTR, monitor)
        # X/Y/Z plot's cells are shallow copies of one p: each cell's keys go into a dict of its own
        p.extra_generation_params = dict(p.extra_generation_params)
        self._add_infotext(p, monitor)
        script_callbacks.on_cfg_denoiser(monitor.on_cfg_denoiser)
        script_callbacks.on_cfg_denoised(monitor.on_cfg_denoised)  # never fired by Forge: harmless there
        return monitor

    @staticmethod
    def stop(monitor: RunMonitor) -> None:
        script_callbacks.remove_callbacks_for_function(monitor.on_cfg_denoiser)
        script_callbacks.remove_callbacks_for_function(monitor.on_cfg_denoised)
        if str(getattr(shared.state, "textinfo", None) or "").startswith("MemoGuard"):
            shared.state.textinfo = None  # /sdapi/v1/progress must not show this run's text after it

    def finish(self, p, monitor: RunMonitor, processed) -> None:
        """The Processed of p's generation gets its panel (found again by its generation info) and summary."""
        self.stop(monitor)
        remember_panel(processed, self._panel(p, monitor))
        processed.comments += "".join(f"{line}\n" for line in self._summary(p, monitor))


    @staticmethod
    def _add_infotext(p, monitor: RunMonitor) -> None:
        """Values are computed when each image's infotext is written, after its sampling."""
        def verdict(kwargs):
            return monitor.verdict(*image_of(kwargs))

        def score(**kw):
            v = verdict(kw)
            return f"{v.score:.4f}" if v.available else None

        def percentile(**kw):
            v = verdict(kw)
            return f"{v.percentile:.1f}" if v.available and math.isfinite(v.percentile) else None

        def notes(**kw):
            v = verdict(kw)
            return "; ".join(v.notes + monitor.scoring_notes()) or None

        def errors(**_):
            return "; ".join(monitor.errors + ([monitor.calibration_problem] if monitor.calibration_problem else [])) \
                or None

        extra = p.extra_generation_params
        extra["MemoGuard score"] = score
        extra["MemoGuard verdict"] = lambda **kw: verdict(kw).label
        extra["MemoGuard percentile"] = percentile
        extra["MemoGuard detector"] = lambda **kw: verdict(kw).detector or None  # what the score is
        extra["MemoGuard model"] = lambda **_: monitor.model_key
        extra["MemoGuard note"] = notes
        extra["MemoGuard error"] = errors
        # the API's info and PNG info carry no processed.comments: the note on the hires pass goes here too
        extra["MemoGuard hires pass"] = lambda **_: "not scored" if monitor.hires_seen else None
        s = monitor.settings
        if s.mitigation != "off":
            def mitigation(**kw):
                iteration, position = image_of(kw)
                return mitigation_text(_mitigation(monitor, iteration), position)
            extra["MemoGuard mitigation"] = mitigation
        if s.training_images:
            extra["MemoGuard copy evidence"] = lambda **kw: monitor.evidence.infotext(*image_of(kw))
        if s.explain:
            extra["MemoGuard tokens"] = lambda **kw: top_tokens_text(monitor.image_explanations(*image_of(kw)))
            extra["MemoGuard explanation"] = lambda **kw: explanation_method(monitor.image_explanations(*image_of(kw)),
                                                                             monitor.explain_note(image_of(kw)[0]))

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
                                     mitigation_text(_mitigation(monitor, iteration), position),
                                     self._chart(p, monitor, result), monitor.explain_note(iteration),
                                     _evidence(monitor, iteration, position)))
        return panel(parts, monitor.errors, list(self._notes(monitor)))

    @staticmethod
    def _chart(p, monitor: RunMonitor, result) -> Chart:
        if result is None:
            return Chart([], [], monitor.settings.window, None, "")
        chart = Chart(list(result.levels), result.trace.step_indices(), monitor.settings.window)
        calibration = monitor.calibration_for(result)
        if calibration is None:
            chart.band_note = "no band: this checkpoint is not calibrated"
        elif calibration.band is None:
            chart.band_note = "no band: the calibration has none (calibrate with band runs > 0)"
        else:
            band = calibration.band
            differs = calibration.check(monitor.prediction(), None, result.latent, float(p.cfg_scale))
            if differs:
                chart.band_note = differs[0] if "band" in differs[0] else f"no band: {differs[0]}"
            else:
                chart.band = band
                chart.band_note = (f"blue: benign band (median to the level {band.fpr:.0%} of benign runs exceed at "
                                   f"each step; {band.settings.get('prompts', '?')} calibration runs)")
        return chart

    def _summary(self, p, monitor: RunMonitor):
        for iteration, position in self._images(p):
            yield f"MemoGuard image {iteration * p.batch_size + position + 1}: " \
                  f"{monitor.verdict(iteration, position).summary()}"
        yield from monitor.errors
        yield from self._notes(monitor)

    @staticmethod
    def _notes(monitor: RunMonitor):
        if monitor.settings.training_images and monitor.entry != MemoGuardAccordion.id_prefix:
            yield ("MemoGuard: copy evidence runs in the MemoGuard Monitor accordion (the WebUI hands each image to "
                   "always-on scripts only)")
        if monitor.calibration_problem:
            yield f"MemoGuard: {monitor.calibration_problem}"
        if monitor.hires_seen:
            yield "MemoGuard scores the first pass only; the hires-fix pass is not scored."
        yield from (f"MemoGuard: {note}" for note in monitor.scoring_notes())


class MemoGuardScript(MemoGuardBase):
    """The "MemoGuard" entry of the Script dropdown."""

    def ui(self, is_img2img):
        import gradio as gr
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Group(elem_id=f"{self.id_prefix}_{tab}"):
            return self._controls(tab)

    def run(self, p, *args):
        monitor = self.start(p, args)
        if monitor is None:
            return processing.process_images(p)
        try:
            processed = processing.process_images(p)
        finally:
            self.stop(monitor)
        self.finish(p, monitor, processed)
        return processed


class MemoGuardAccordion(MemoGuardBase):
    """MemoGuard as an always-visible accordion: on together with X/Y/Z plot or any other dropdown script, one
    run per process_images call (each X/Y/Z cell). API: alwayson_scripts {"memoguard monitor": {"args": [enabled,
    then the dropdown's script_args]}}."""

    id_prefix = "memoguard_accordion"

    def title(self):
        return "MemoGuard Monitor"  # its own name: the WebUI maps scripts by title

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion("MemoGuard", open=False, elem_id=f"{self.id_prefix}_{tab}"):
            enabled = gr.Checkbox(False, label="Enable MemoGuard", elem_id=f"{self.id_prefix}_enabled_{tab}",
                                  info="Score every image of this generation (with X/Y/Z plot: every cell)")
            return [enabled] + self._controls(tab)

    def process(self, p, enabled=False, *args):
        if enabled:
            self.start(p, args)

    def postprocess_image(self, p, pp, enabled=False, *args):
        """Each image as the WebUI hands it over, before its infotext is written: its copy evidence."""
        monitor = getattr(p, RUN_ATTR, None)
        if enabled and isinstance(monitor, RunMonitor) and monitor.entry == self.id_prefix and monitor.evidence:
            monitor.evidence.judge(pp.image, int(getattr(p, "iteration", 0) or 0))

    def postprocess(self, p, processed, enabled=False, *args):
        monitor = getattr(p, RUN_ATTR, None)
        if enabled and isinstance(monitor, RunMonitor) and monitor.entry == self.id_prefix:
            self.finish(p, monitor, processed)


def _evidence(monitor: RunMonitor, iteration: int, position: int):
    """(infotext line, card PNG as base64) of an image's copy evidence; None when copy evidence is off."""
    if monitor.evidence is None:
        return None
    return monitor.evidence.infotext(iteration, position), monitor.evidence.card(iteration, position)


def _mitigation(monitor: RunMonitor, iteration: int):
    result = monitor.results.get(iteration)
    return result.mitigation if result is not None else None


script_callbacks.on_app_started(api.register_api)
