"""Mitigation inside ComfyUI's sampler (CALC_COND_BATCH wrapper, post-CFG function) against the harness."""
import pytest
import torch

from nodes.mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation, session_of
from nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
from . import harness

STEPS = 3


@pytest.fixture(scope="module")
def unet():
    return harness.tiny_unet()[0]


def setup(unet, batch=1, **settings):
    torch.manual_seed(2)
    base = harness.ModelPatcher(harness.BaseModel(unet))
    texts = []
    settings.setdefault("strategy", "minimize")
    session = MitigationSession(MitigationSettings(**settings), node_id="9", emit=lambda e, d: None,
                                show=lambda text, node: texts.append(text))
    monitor = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda text, node: None)
    inputs = (torch.randn(batch, 3, 16, 16), torch.randn(1, 77, 64), torch.randn(1, 77, 64))
    return base, session, monitor, texts, inputs


@pytest.mark.parametrize("batch", [1, 2])
def test_always_lowers_the_first_step_score_the_sampler_then_sees(unet, batch):
    base, session, monitor, texts, inputs = setup(unet, batch=batch, mitigation="always", lr=0.1, max_iters=5)
    patched = attach_monitor(attach_mitigation(base, session), monitor)
    assert session_of(patched) is session
    mitigated = harness.sample(patched, *inputs, steps=STEPS)
    record = session.record
    assert record.ran and record.iterations == 5
    assert all(a < b for a, b in zip(record.after, record.before))
    # the sampler's own first step ran with the optimized embedding
    assert monitor.trace.per_step()[0].tolist() == pytest.approx(record.after, rel=1e-3, abs=1e-6)
    assert not torch.equal(mitigated, harness.sample(base, *inputs, steps=STEPS))
    assert "5 iterations" in texts[-1] and "->" in texts[-1]


def test_runs_once_per_sampling_run(unet):
    base, session, _, _, inputs = setup(unet, mitigation="always", max_iters=2)
    patched = attach_mitigation(base, session)
    harness.sample(patched, *inputs, steps=STEPS)
    first = session.record
    harness.sample(patched, *inputs, steps=STEPS)
    assert session.record is not first and session.record.iterations == 2


@pytest.mark.parametrize("settings", [dict(mitigation="off"), dict(mitigation="auto", threshold=1e9)])
def test_off_or_unflagged_auto_leaves_the_image_bit_identical(unet, settings):
    base, session, _, texts, inputs = setup(unet, **settings)
    out = harness.sample(attach_mitigation(base, session), *inputs, steps=STEPS)
    assert torch.equal(out, harness.sample(base, *inputs, steps=STEPS))
    if settings["mitigation"] == "auto":
        assert not session.record.ran and "under threshold" in texts[-1]


def test_cfg1_has_no_negative_and_says_so(unet):
    base, session, _, texts, inputs = setup(unet, mitigation="always")
    out = harness.sample(attach_mitigation(base, session), *inputs, cfg=1.0, steps=STEPS)
    assert torch.equal(out, harness.sample(base, *inputs, cfg=1.0, steps=STEPS))
    assert session.record is None and "cfg != 1" in texts[-1]


def test_failure_leaves_the_prompt_and_sampling_alone(unet):
    base, session, _, texts, inputs = setup(unet, mitigation="always")
    broken = attach_mitigation(base, session)
    session.at_model_call = lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory"))
    out = harness.sample(broken, *inputs, steps=STEPS)
    assert torch.equal(out, harness.sample(base, *inputs, steps=STEPS))
    assert "out of memory" in session.error and "prompt unchanged" in texts[-1]


def _fail_in_backward_passes(base, error):
    """The model raises `error` whenever MemoGuard asks for a gradient (the sampler's own calls go through)."""
    inner = base.model.apply_model

    def apply_model(x, t, **kwargs):
        if kwargs["c_crossattn"].requires_grad:
            raise error
        return inner(x, t, **kwargs)
    base.model.apply_model = apply_model


def test_out_of_memory_inside_minimization_samples_the_plain_prompt(unet):
    base, session, _, texts, inputs = setup(unet, mitigation="always", max_iters=5)
    plain = harness.sample(base, *inputs, steps=STEPS)
    patched = attach_mitigation(base, session)
    _fail_in_backward_passes(base, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out = harness.sample(patched, *inputs, steps=STEPS)
    assert torch.equal(out, plain)
    assert session.record is None and "ran out of memory" in session.error and "freed" in texts[-1]


def test_an_interrupt_stops_the_minimization_at_once(unet, monkeypatch):
    from comfy import model_management
    base, session, _, texts, inputs = setup(unet, mitigation="always", max_iters=50)
    calls = []
    inner = base.model.apply_model

    def apply_model(x, t, **kwargs):  # the user presses Cancel during the second gradient
        if kwargs["c_crossattn"].requires_grad:
            calls.append(1)
            if len(calls) == 2:
                monkeypatch.setattr(model_management, "interrupt_processing", True)
        return inner(x, t, **kwargs)
    base.model.apply_model = apply_model
    try:
        harness.sample(attach_mitigation(base, session), *inputs, steps=STEPS)
    finally:
        monkeypatch.setattr(model_management, "interrupt_processing", False)
    assert len(calls) == 2 and session.record is None
    assert "interrupted" in session.error and "prompt unchanged" in texts[-1]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="needs a threshold"):
        MitigationSettings(mitigation="auto")
    with pytest.raises(ValueError, match="mode must be one of"):
        MitigationSettings(mitigation="sometimes")
    with pytest.raises(ValueError, match="must be auto or one of"):
        MitigationSettings(strategy="prayer")
    with pytest.raises(ValueError, match="early_scale must be <= 0"):
        MitigationSettings(strategy="opposite_guidance", early_scale=2.0)
    with pytest.raises(ValueError, match="delay must be in"):
        MitigationSettings(strategy="guidance_delay", delay=1.0)


def test_guidance_delay_keeps_the_first_step_score_and_steers_the_rest(unet):
    base, session, monitor, texts, inputs = setup(unet, mitigation="always", strategy="guidance_delay", delay=0.5)
    plain_monitor = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda text, node: None)
    plain = harness.sample(attach_monitor(base, plain_monitor), *inputs, steps=4)
    steered = harness.sample(attach_monitor(attach_mitigation(base, session), monitor), *inputs, steps=4)
    record = session.record
    assert record.ran and record.strategy == "guidance_delay" and record.delay_steps == 2
    # the score is read from the same first step; afterwards the trajectory differs
    assert monitor.trace.per_step()[0].tolist() == plain_monitor.trace.per_step()[0].tolist()
    assert monitor.trace.per_step()[2].tolist() != plain_monitor.trace.per_step()[2].tolist()
    assert not torch.equal(steered, plain)
    assert texts[-1].startswith("MemoGuard: delayed guidance: no text guidance for the first 2 steps")
    # a delay of 0 steps is the plain run, bit for bit
    assert torch.equal(harness.sample(attach_mitigation(base, MitigationSession(
        MitigationSettings(mitigation="always", strategy="guidance_delay", delay=0.0), emit=lambda e, d: None,
        show=lambda t, n: None)), *inputs, steps=4), plain)


def test_guidance_delay_auto_steers_only_flagged_images(unet):
    base, session, monitor, texts, inputs = setup(unet, batch=2, mitigation="auto", threshold=0.0,
                                                  strategy="guidance_delay", delay=0.5)
    probe = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda text, node: None)
    plain = harness.sample(attach_monitor(base, probe), *inputs, steps=4)
    first = probe.trace.per_step()[0]
    session.settings.threshold = float(first.mean())  # between the two images' scores
    steered = harness.sample(attach_mitigation(base, session), *inputs, steps=4)
    high = int(first.argmax())
    assert session.record.image_iterations[high] == 2 and session.record.image_iterations[1 - high] == 0
    assert torch.equal(steered[1 - high], plain[1 - high]) and not torch.equal(steered[high], plain[high])


def test_guidance_delay_failure_leaves_sampling_alone(unet):
    base, session, _, texts, inputs = setup(unet, mitigation="always", strategy="guidance_delay")
    session._plan_schedule = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    out = harness.sample(attach_mitigation(base, session), *inputs, steps=STEPS)
    assert torch.equal(out, harness.sample(base, *inputs, steps=STEPS))
    assert "boom" in session.error


def test_opposite_guidance_keeps_the_first_step_score_and_guides_away_from_the_prompt(unet):
    base, session, monitor, texts, inputs = setup(unet, mitigation="always", strategy="opposite_guidance")
    plain_monitor = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda text, node: None)
    plain = harness.sample(attach_monitor(base, plain_monitor), *inputs, steps=10)
    steered = harness.sample(attach_monitor(attach_mitigation(base, session), monitor), *inputs, steps=10)
    record = session.record
    # its measured defaults: 0.2 of the steps at -3
    assert record.ran and record.strategy == "opposite_guidance" and (record.delay_steps, record.early_scale) == (2, -3.0)
    assert monitor.trace.per_step()[0].tolist() == plain_monitor.trace.per_step()[0].tolist()
    assert not torch.equal(steered, plain)
    assert "guidance -3 (away from the prompt) for the first 2 steps" in texts[-1]
    delayed = harness.sample(attach_mitigation(base, MitigationSession(
        MitigationSettings(mitigation="always", strategy="guidance_delay", delay=0.2), emit=lambda e, d: None,
        show=lambda t, n: None)), *inputs, steps=10)
    assert not torch.equal(steered, delayed)


TEXT = "a purple ring, lighthouse poster"


@pytest.fixture(scope="module")
def prompted():
    """The bundled model's trained UNet and CLIP (TEXT is one of its memorized captions); conditionings as CLIP Text
    Encode and MemoGuard Text Encode make them."""
    from memoguard.standalone.diffusers_model import load_model
    from nodes.comfy_model import with_prompt_source
    bundled = load_model()
    unet, text_encoder = bundled.unet, bundled.text_encoders[0]
    clip = harness.CLIP(text_encoder)
    with torch.inference_mode():
        plain = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return unet, clip, plain, with_prompt_source(plain, TEXT, clip), negative


def _session(texts, **settings):
    return MitigationSession(MitigationSettings(**settings), node_id="9", emit=lambda e, d: None,
                             show=lambda text, node: texts.append(text))


def test_auto_masks_the_padding_of_a_prompt_from_memoguard_text_encode(prompted):
    unet, clip, plain_cond, sourced, negative = prompted
    base = harness.ModelPatcher(harness.BaseModel(unet))
    torch.manual_seed(3)
    noise = torch.randn(2, 3, 16, 16)
    texts, monitor = [], MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
    session = _session(texts, mitigation="always", strategy="auto")
    out = harness.sample(attach_monitor(attach_mitigation(base, session), monitor), noise, sourced, negative, steps=4)
    record = session.record
    assert session.strategy == "mask_padding" and record.ran and record.strategy == "mask_padding"
    assert record.masked == [77 - 6 - 2] * 2  # BOS, the 6 words, their end-of-text kept
    # the sampler's own first step ran with the masked embedding: its score is the one the record reports
    assert monitor.trace.per_step()[0].tolist() == pytest.approx(record.after, rel=1e-4, abs=1e-7)
    assert not torch.equal(out, harness.sample(base, noise, sourced, negative, steps=4))
    assert "padding masked: 69 padding positions zeroed" in texts[-1]
    # the same settings with CLIP Text Encode's conditioning: the best schedule, no text needed
    texts = []
    session = _session(texts, mitigation="always", strategy="auto")
    harness.sample(attach_mitigation(base, session), noise, plain_cond, negative, steps=5)
    assert session.strategy == "opposite_guidance" and session.record.ran


def test_text_strategies_say_what_they_need_and_leave_the_image_alone(prompted):
    from nodes.comfy_model import with_prompt_source
    unet, clip, plain_cond, _, negative = prompted
    base = harness.ModelPatcher(harness.BaseModel(unet))
    noise = torch.randn(1, 3, 16, 16, generator=torch.manual_seed(4))
    plain = harness.sample(base, noise, plain_cond, negative, steps=3)
    for strategy in ("mask_padding", "remove_tokens"):
        texts = []
        session = _session(texts, mitigation="always", strategy=strategy)
        assert torch.equal(harness.sample(attach_mitigation(base, session), noise, plain_cond, negative, steps=3), plain)
        assert session.record is None and "MemoGuard Text Encode" in texts[-1]
    # a conditioning changed after MemoGuard Text Encode is not its prompt's: token removal does not re-encode it
    changed = with_prompt_source([[plain_cond[0][0] * 1.5, plain_cond[0][1]]], TEXT, clip)
    texts = []
    session = _session(texts, mitigation="always", strategy="remove_tokens")
    harness.sample(attach_mitigation(base, session), noise, changed, negative, steps=3)
    assert session.record is None and "a node changed it on the way" in texts[-1]


def test_token_removal_in_the_sampler_removes_words_and_samples_the_prompt_without_them(prompted):
    unet, clip, _, sourced, negative = prompted
    base = harness.ModelPatcher(harness.BaseModel(unet))
    noise = torch.randn(1, 3, 16, 16, generator=torch.manual_seed(5))
    # a batch: the sampler's timestep has one sigma per image, the candidates' batches are larger (issue of a run)
    batch = _session([], mitigation="always", strategy="remove_tokens", target=0.0)
    harness.sample(attach_mitigation(base, batch), noise.repeat(4, 1, 1, 1), sourced, negative, steps=3)
    assert batch.error is None and batch.record.ran and all(batch.record.removed)
    texts, monitor = [], MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
    session = _session(texts, mitigation="always", strategy="remove_tokens", target=0.0)
    harness.sample(attach_monitor(attach_mitigation(base, session), monitor), noise, sourced, negative, steps=3)
    record = session.record
    assert record.ran and record.removed[0] and all(w in TEXT for w in record.removed[0])
    assert monitor.trace.per_step()[0].tolist() == pytest.approx(record.after, rel=1e-4, abs=1e-7)
    # what the sampler ran is the prompt typed without those words
    kept = " ".join(w for w in TEXT.replace(",", " ,").split() if w not in record.removed[0]).replace(" ,", ",")
    typed = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
    with torch.inference_mode():
        typed_cond = clip.encode_from_tokens_scheduled(clip.tokenize(kept))
    harness.sample(attach_monitor(base, typed), noise, typed_cond, negative, steps=3)
    assert monitor.trace.per_step()[0].tolist() == pytest.approx(typed.trace.per_step()[0].tolist(), rel=1e-4)
    assert "token removal: removed" in texts[-1]


def test_memoguard_text_encode_is_clip_text_encode_plus_the_prompt(prompted):
    import importlib
    from nodes.comfy_model import prompt_source
    _, clip, plain_cond, _, _ = prompted
    with harness.comfy_api_stand_in():
        node = importlib.import_module("nodes.nodes_text_encode").MemoGuardTextEncode
        (conditioning,) = node.execute(TEXT, clip).args
        with pytest.raises(RuntimeError, match="clip input is empty"):
            node.execute(TEXT, None)
    assert torch.equal(conditioning[0][0], plain_cond[0][0])
    source = prompt_source(conditioning[0][1])
    assert source.text == TEXT and source.clip is clip
