"""Issue 11 on the stand-in WebUI: per-run state on p, the always-visible accordion (with X/Y/Z-style cells),
and MemoGuard's own failures (out of memory, an interrupt) never costing the image."""
import copy
import sys

import pytest
import torch

from memoguard_a1111.host_model import WebUIModel
from memoguard_a1111.monitor import RunMonitor
from memoguard_a1111.script import ARG_NAMES, DEFAULTS, MemoGuardAccordion, MemoGuardScript
from modules import processing, script_callbacks, scripts, shared
from modules.sd_samplers_common import InterruptedException
from test_script import infotext_fields, make_p, run


def no_cfg_callbacks() -> bool:
    return not script_callbacks.callback_map["cfg_denoiser"] and not script_callbacks.callback_map["cfg_denoised"]


def accordion_args(enabled=True, **settings):
    return [enabled] + [settings.get(name, default) for name, default in zip(ARG_NAMES, DEFAULTS)]


def with_accordion(p, accordion, **settings):
    p.scripts = scripts.ScriptRunner([(accordion, accordion_args(**settings))])
    return p


def test_results_travel_with_p_not_with_the_script(webui):
    script = MemoGuardScript()
    args = [d for d in DEFAULTS]
    first, second = make_p(webui, seed=3), make_p(webui, seed=4)
    out_first, out_second = script.run(first, *args), script.run(second, *args)
    assert first.memoguard is not second.memoguard
    assert first.memoguard.results[0].trace.per_step()[0] != second.memoguard.results[0].trace.per_step()[0]
    assert infotext_fields(out_first.infotexts[0])["MemoGuard score"] != \
        infotext_fields(out_second.infotexts[0])["MemoGuard score"]
    assert not any(isinstance(v, RunMonitor) for v in list(vars(script).values()) + list(vars(MemoGuardScript).values()))
    assert no_cfg_callbacks()  # nothing left registered after either run


def test_accordion_scores_each_cell_of_a_cfg_grid_and_leaves_images_alone(webui):
    accordion = MemoGuardAccordion()
    base = with_accordion(make_p(webui), accordion)
    cells = {}
    for cfg in (3.0, 7.0, 11.0):  # what X/Y/Z plot does per cell: a copy of p through process_images
        cell = copy.copy(base)
        cell.cfg_scale = cfg
        cell.extra_generation_params = {}
        cells[cfg] = (cell, processing.process_images(cell))
    scores = {cfg: infotext_fields(out.infotexts[0])["MemoGuard score"] for cfg, (_, out) in cells.items()}
    # the first-step gap does not depend on the CFG scale (same x_T): one score, three different images
    assert len(set(scores.values())) == 1, scores
    assert not torch.equal(cells[3.0][1].images[0], cells[11.0][1].images[0])
    assert len({id(cell.memoguard) for cell, _ in cells.values()}) == 3
    plain = make_p(webui, cfg_scale=7.0)
    assert torch.equal(processing.process_images(plain).images[0], cells[7.0][1].images[0])
    assert cells[7.0][1].comments.count("MemoGuard image 1: ") == 1
    assert no_cfg_callbacks()


def test_accordion_off_adds_nothing(webui):
    p = with_accordion(make_p(webui), MemoGuardAccordion(), enabled=False)
    out = processing.process_images(p)
    assert "MemoGuard score" not in infotext_fields(out.infotexts[0]) and not hasattr(p, "memoguard")


def test_dropdown_and_accordion_together_run_once(webui):
    accordion = MemoGuardAccordion()
    p = with_accordion(make_p(webui), accordion)
    monitor, out = run(p)
    assert monitor.entry == MemoGuardScript.id_prefix and "both as a script and in its accordion" in out.comments
    assert out.comments.count("MemoGuard image 1:") == 1


def _fail_when_differentiating(monkeypatch, error):
    inner = WebUIModel.raw_prediction

    def raw_prediction(self, x, t, embedding, extra):
        if embedding.requires_grad:
            raise error
        return inner(self, x, t, embedding, extra)
    monkeypatch.setattr(WebUIModel, "raw_prediction", raw_prediction)


@pytest.mark.parametrize("what", [dict(explain=True, explain_method="gradient_x_delta"),
                                  dict(mitigation="always", strategy="minimize", max_iters=3)])
def test_out_of_memory_inside_memoguard_keeps_the_image(webui, monkeypatch, what):
    plain = processing.process_images(make_p(webui))
    _fail_when_differentiating(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB"))
    monitor, out = run(make_p(webui), **what)
    fields = infotext_fields(out.infotexts[0])
    assert torch.equal(plain.images[0], out.images[0])  # the plain prompt, sampled as without MemoGuard
    assert "ran out of memory" in fields["MemoGuard error"] and "freed" in fields["MemoGuard error"]
    assert float(fields["MemoGuard score"]) > 0  # the score still comes from the sampler's own passes


def test_an_interrupt_stops_the_minimization_at_once(webui, monkeypatch):
    calls = []
    inner = WebUIModel.raw_prediction

    def raw_prediction(self, x, t, embedding, extra):  # the user presses Interrupt during the second gradient
        if embedding.requires_grad:
            calls.append(1)
            if len(calls) == 2:
                shared.state.interrupted = True
        return inner(self, x, t, embedding, extra)
    monkeypatch.setattr(WebUIModel, "raw_prediction", raw_prediction)
    p = make_p(webui)
    try:
        with pytest.raises(InterruptedException):  # then the WebUI's sampler stops, as after any Interrupt
            run(p, mitigation="always", strategy="minimize", max_iters=50)
    finally:
        shared.state.interrupted = False
    assert len(calls) == 2
    assert any("interrupted" in e for e in p.memoguard.errors)
    assert p.memoguard.results[0].mitigation is None and p.memoguard.results[0].embedding is None
    assert no_cfg_callbacks()


class _Gradio:
    """Records the components a script's ui() builds (gradio is the WebUI's own; not installed here)."""

    class _Block:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def __init__(self):
        self.Row = self.Group = self.Accordion = lambda *a, **kw: self._Block()

    def __getattr__(self, component):
        def make(*args, **kwargs):
            block = self._Block()
            block.elem_id, block.value = kwargs.get("elem_id"), kwargs.get("value", args[0] if args else None)
            block.click = block.change = lambda **kw: None
            return block
        return make


@pytest.mark.parametrize("script_class", [MemoGuardScript, MemoGuardAccordion])
def test_the_controls_come_back_in_script_args_order(monkeypatch, script_class):
    """The WebUI hands run()/process() the values of ui()'s components in the order ui() returned them; the
    layout puts them in rows of another order."""
    monkeypatch.setitem(sys.modules, "gradio", _Gradio())
    script = script_class()
    script.is_img2img = False
    controls = script.ui(False)
    if script_class is MemoGuardAccordion:
        enabled, *controls = controls
        assert enabled.value is False
    prefix = f"{script_class.id_prefix}_"
    assert [c.elem_id[len(prefix):-len("_txt2img")] for c in controls] == list(ARG_NAMES)
    assert [c.value for c in controls] == list(DEFAULTS)


def test_callbacks_of_a_generation_that_raised_are_removed_by_the_next_run(webui):
    accordion = MemoGuardAccordion()
    crashed = with_accordion(make_p(webui), accordion)
    accordion.process(crashed, *accordion_args())  # the WebUI raised after process(): no postprocess
    assert not no_cfg_callbacks()
    out = processing.process_images(with_accordion(make_p(webui), accordion))
    assert "MemoGuard score" in infotext_fields(out.infotexts[0]) and no_cfg_callbacks()
