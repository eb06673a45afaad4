"""The Memorization Monitor hook against ComfyUI's sampler contracts (tests/comfyui/harness.py)."""
import pytest
import torch

from memoguard import step_score

from nodes.monitor_hook import (CFG1_MESSAGE, MemorizationFlagged, MonitorSession, MonitorSettings,
                                attach_monitor, session_of)
from . import harness

STEPS = 4


@pytest.fixture(scope="module")
def unet():
    return harness.tiny_unet()[0]


def setup(unet, flow=False, batch=1, **settings):
    torch.manual_seed(1)
    base = harness.ModelPatcher(harness.BaseModel(unet, flow=flow))
    events = []
    session = MonitorSession(MonitorSettings(**settings), node_id="7",
                             emit=lambda e, d: events.append((e, d)), show=lambda text, node: events.append(("text", text)))
    noise = torch.randn(batch, 3, 16, 16)
    positive, negative = torch.randn(1, 77, 64), torch.randn(1, 77, 64)
    return base, session, events, (noise, positive, negative)


def first_step_gap(model, noise, positive, negative):
    """The score straight from the model at the sampler's x_T: of eps_c - eps_u, a rectified flow's of v_c - v_u
    (x = x0 + sigma * v, so (D_u - D_c) / sigma in both)."""
    sigmas = harness.schedule(model, STEPS)
    x = model.model_sampling.noise_scaling(sigmas[:1], noise, torch.zeros_like(noise), max_denoise=True)
    t = sigmas[:1].expand(noise.shape[0])
    with torch.no_grad():
        d_c = model.apply_model(x, t, c_crossattn=positive.expand(noise.shape[0], -1, -1))
        d_u = model.apply_model(x, t, c_crossattn=negative.expand(noise.shape[0], -1, -1))
    sigma = sigmas[0]
    return step_score((x - d_c) / sigma - (x - d_u) / sigma)


@pytest.mark.parametrize("flow", [False, True])
def test_monitor_leaves_image_bit_identical_and_scores_each_step(unet, flow):
    base, session, events, inputs = setup(unet, flow=flow)
    plain = harness.sample(base, *inputs, steps=STEPS)
    watched = harness.sample(attach_monitor(base, session), *inputs, steps=STEPS)
    assert torch.equal(plain, watched)
    assert session.trace.per_step().shape == (STEPS, 1)
    assert [d["step"] for e, d in events if e == "step"] == list(range(STEPS))
    expected = first_step_gap(base.model, *inputs)
    assert session.trace.per_step()[0] == pytest.approx(expected.tolist(), rel=1e-4)
    # a flow sampler starts at sigma 1, where the noise difference (1 - sigma)(v_c - v_u) is zero: the score must
    # read the velocity there
    assert float(session.trace.per_step()[0, 0]) > 1e-3
    assert session.error is None


def test_batch_scores_each_image_like_alone(unet):
    base, session, _, (noise, pos, neg) = setup(unet, batch=2)
    harness.sample(attach_monitor(base, session), noise, pos, neg, steps=STEPS)
    both = session.trace.per_step()
    assert both.shape == (STEPS, 2)
    for i in range(2):
        _, alone, _, _ = setup(unet)
        harness.sample(attach_monitor(base, alone), noise[i:i + 1], pos, neg, steps=STEPS)
        assert alone.trace.per_step()[:, 0] == pytest.approx(both[:, i].tolist(), rel=1e-3, abs=1e-6)


def counting_calls(base):
    """The model's apply_model calls, counted per batch row."""
    calls = []
    apply_model = base.model.apply_model
    base.model.apply_model = lambda x, t, **kw: calls.append(x.shape[0]) or apply_model(x, t, **kw)
    return calls


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("window", [1, 2])
def test_cfg1_scores_the_verdicts_steps_with_one_extra_model_call_each(unet, flow, window):
    """At cfg 1 ComfyUI skips the negative prompt's pass; the Monitor runs it itself for the steps its verdict reads
    and no others, and the image is the unmonitored one bit for bit."""
    base, session, events, inputs = setup(unet, flow=flow, batch=2, window=window)
    calls = counting_calls(base)
    plain = harness.sample(base, *inputs, cfg=1.0, steps=STEPS)
    plain_calls = sum(calls)
    watched = harness.sample(attach_monitor(base, session), *inputs, cfg=1.0, steps=STEPS)
    assert torch.equal(plain, watched)
    assert sum(calls) - plain_calls == plain_calls + 2 * window  # one extra pass a scored step, per image
    assert session.trace.unavailable is None and len(session.trace) == window
    assert session.trace.per_step()[0] == pytest.approx(first_step_gap(base.model, *inputs).tolist(), rel=1e-4)
    assert all(v.available for v in session.final_verdicts())
    assert any("1 extra model call" in note for note in session.to_dict()["notes"])  # what the panel shows


def test_cfg1_without_a_negative_says_unavailable_instead_of_scoring_zeros(unet):
    base, session, events, (noise, positive, _) = setup(unet)
    watched = harness.sample(attach_monitor(base, session), noise, positive, None, cfg=1.0, steps=STEPS)
    assert torch.equal(watched, harness.sample(base, noise, positive, None, cfg=1.0, steps=STEPS))
    assert session.trace.unavailable == CFG1_MESSAGE
    assert not [e for e, _ in events if e == "step"]
    verdict = session.final_verdicts()[0]
    assert not verdict.available and "cfg 1" in verdict.summary()


def test_cfg1_toggle_forces_the_uncond_pass(unet):
    base, session, _, inputs = setup(unet, force_uncond_at_cfg1=True)
    harness.sample(attach_monitor(base, session), *inputs, cfg=1.0, steps=STEPS)
    assert session.trace.unavailable is None
    assert session.trace.per_step()[0] == pytest.approx(first_step_gap(base.model, *inputs).tolist(), rel=1e-4)


def test_hook_survives_a_downstream_clone_and_a_second_run(unet):
    base, session, _, inputs = setup(unet)
    downstream = attach_monitor(base, session).clone()  # e.g. a LoRA or another patch node after the Monitor
    downstream.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
    assert session_of(downstream) is session
    harness.sample(downstream, *inputs, steps=STEPS)
    harness.sample(downstream, *inputs, steps=STEPS + 2)
    assert session.runs == 2 and len(session.trace) == STEPS + 2


def test_second_order_sampler_keeps_one_score_per_step(unet):
    base, session, _, inputs = setup(unet)
    harness.sample(attach_monitor(base, session), *inputs, steps=STEPS, sampler="heun")
    assert session.trace.step_indices() == list(range(STEPS))


def test_failure_inside_the_hook_is_reported_and_sampling_goes_on(unet):
    base, session, events, inputs = setup(unet)

    def broken_emit(event, data):
        if event == "step":
            raise RuntimeError("browser went away")
        events.append((event, data))

    session.emit = broken_emit
    plain = harness.sample(base, *inputs, steps=STEPS)
    assert torch.equal(harness.sample(attach_monitor(base, session), *inputs, steps=STEPS), plain)
    assert "browser went away" in session.error
    assert any(e == "text" and "monitor error" in d for e, d in events)


@pytest.mark.parametrize("action", ["none", "warn", "stop"])
def test_flagged_action(unet, action):
    base, session, events, inputs = setup(unet, threshold=0.0, action=action, window=2)
    patched = attach_monitor(base, session)
    if action == "stop":
        with pytest.raises(MemorizationFlagged, match="LIKELY MEMORIZED"):
            harness.sample(patched, *inputs, steps=STEPS)
        assert len(session.trace) == 2  # stopped right after the verdict window
    else:
        harness.sample(patched, *inputs, steps=STEPS)
        assert len(session.trace) == STEPS
    verdicts = [d for e, d in events if e == "verdict"]
    assert len(verdicts) == 1 and verdicts[0]["flagged"]
    assert "(set by hand)" in session.final_verdicts()[0].summary()  # the node's threshold, not a calibration's


def test_unflagged_below_threshold(unet):
    base, session, events, inputs = setup(unet, threshold=1e9, action="stop")
    harness.sample(attach_monitor(base, session), *inputs, steps=STEPS)
    assert not session.final_verdicts()[0].flagged
    assert [d["flagged"] for e, d in events if e == "verdict"] == [False]


def test_bad_settings_are_refused_with_a_message():
    with pytest.raises(ValueError, match="action must be one of"):
        MonitorSettings(action="explode")
    with pytest.raises(ValueError, match="window"):
        MonitorSettings(window=0)
