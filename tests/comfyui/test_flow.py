"""Rectified-flow models (SD3, Flux, Chroma, Qwen-Image) against the harness: the score reads the velocity
difference (x = x0 + sigma * v), calibrations record prediction "flow", and explanation and mitigation run where
the conditioning is laid out as the tokenizer's tokens; the real families run in tests/comfyui/real_host_flow.py."""
import types

import pytest
import torch

from memoguard import Calibration, step_score, token_contributions
from nodes.calibration_choice import embedded_guidance, lookup, model_key
from memoguard.host_autograd import differentiable
from memoguard.model import CHUNK, WORD_START, ddim_step
from nodes.calibration_run import calibrate_loaded
from nodes.comfy_model import (CONSTANT, ComfyDiffusionModel, UnsupportedModel, _without, model_inputs,
                               split_model_conds, with_prompt_source)
from nodes.mitigation_hook import MitigationSession, MitigationSettings, attach_mitigation
from nodes.monitor_hook import MonitorSession, MonitorSettings, attach_monitor
from . import harness

STEPS = 4
TEXT = "a purple ring, lighthouse poster"
PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "cross")]
T5_LENGTH = 256  # a T5 conditioning padded to 256 positions (Flux): not the CLIP tokenizer's 77


class PaddedEncoder(harness.CLIP):
    """A text encoder whose positions are not its tokenizer's (as T5 beside a CLIP in SD3 and Flux)."""

    def encode_from_tokens_scheduled(self, tokens):
        [[hidden, options]] = super().encode_from_tokens_scheduled(tokens)
        return [[torch.nn.functional.pad(hidden, (0, 0, 0, T5_LENGTH - hidden.shape[1])), options]]


@pytest.fixture(scope="module")
def flow():
    with torch.inference_mode():
        unet, text = harness.tiny_unet(seed=7)
        return harness.ModelPatcher(harness.BaseModel(unet, flow=True)), harness.CLIP(text)


def monitored_run(patcher, clip, text=TEXT, seed=0, wrap=lambda p: p, **settings):
    session = MonitorSession(MonitorSettings(**settings), emit=lambda e, d: None, show=lambda t, n: None)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    args = (noise, pos, neg)
    out = harness.sample(attach_monitor(wrap(patcher), session), *args, cfg=3.0, steps=STEPS)
    plain = harness.sample(patcher, *args, cfg=3.0, steps=STEPS)
    return session, out, plain, args


def test_the_adapter_scores_explains_and_steps_as_the_flow_sampler(flow):
    patcher, clip = flow
    monitor, out, plain, (noise, _, _) = monitored_run(patcher, clip)
    assert torch.equal(out, plain)
    base, sigmas = patcher.model, harness.schedule(patcher.model, STEPS)
    assert float(sigmas[0]) == 1.0  # flow samplers start from pure noise
    with torch.inference_mode(), differentiable(base):
        adapter = ComfyDiffusionModel(base, sigmas, clip, noise)
        cond, uncond = adapter.encode([TEXT]), adapter.encode([""], prompt_type="negative")
        x_T = adapter.initial_x(noise)
        eps_c, eps_u = adapter.eps_pair(x_T, sigmas[0], cond, uncond)
        # the core's DDIM step in (alpha, sigma) = (1, sigma) is the sampler's Euler step of the flow
        x_1 = ddim_step(x_T, eps_u + 3.0 * (eps_c - eps_u), adapter.coefficients(sigmas[0]),
                        adapter.coefficients(sigmas[1]))
        second = adapter.eps_pair(x_1, sigmas[1], cond, uncond)
        result = token_contributions(adapter, cond, uncond, x_T, total_steps=STEPS, method="leave_one_out")[0]
    trace = monitor.trace.per_step()
    assert step_score(eps_c - eps_u).tolist() == pytest.approx(trace[0].tolist(), rel=1e-4)
    assert float(trace[0, 0]) > 1e-3
    assert step_score(second[0] - second[1]).tolist() == pytest.approx(trace[1].tolist(), rel=1e-3)
    assert result.tokens == ["a", "purple", "ring", ",", "lighthouse", "poster"]
    assert result.method == "leave_one_out" and None not in result.to_dict()["score_without"]


def test_a_flow_calibration_records_flow_and_serves_that_model_only(flow, tmp_path):
    patcher, clip = flow
    sigmas = harness.schedule(patcher.model, STEPS)
    result = calibrate_loaded(patcher, clip, (3, 16, 16), sigmas, PROMPTS, tmp_path, cfg=3.0, band_prompts=2, seed=0,
                              batch_size=4, scheduler="normal")
    cal = Calibration.load(result.path, model_key(patcher.model))
    assert cal.conditions["prediction"] == "flow" and cal.conditions["noise_level"] == pytest.approx(1.0)
    assert cal.median > 1e-3 and cal.band is not None
    session, out, plain, _ = monitored_run(patcher, clip, PROMPTS[0], calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain)
    (verdict,) = session.final_verdicts()
    assert verdict.label in ("ok", "flagged") and verdict.threshold == pytest.approx(cal.threshold(0.01))
    assert verdict.notes == [] and min(abs(s - verdict.score) for s in cal.scores) < 1e-5
    with torch.inference_mode():
        other = harness.ModelPatcher(harness.BaseModel(harness.tiny_unet(seed=8)[0], flow=True))
    session = monitored_run(other, clip, PROMPTS[0], calibration=lookup("auto", folders=[tmp_path]))[0]
    assert session.final_verdicts()[0].label == "uncalibrated"


def test_mitigation_steers_a_flow_model_and_the_sampler_reads_the_lowered_score(flow):
    patcher, clip = flow
    for strategy in ("remove_tokens", "mask_padding", "minimize"):
        texts = []
        session = MitigationSession(MitigationSettings(mitigation="always", strategy=strategy, max_iters=4),
                                    emit=lambda e, d: None, show=lambda t, n: texts.append(t))
        monitor = MonitorSession(MonitorSettings(), emit=lambda e, d: None, show=lambda t, n: None)
        noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            pos = with_prompt_source(clip.encode_from_tokens_scheduled(clip.tokenize(TEXT)), TEXT, clip)
            neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        harness.sample(attach_monitor(attach_mitigation(patcher, session), monitor), noise, pos, neg, cfg=3.0,
                       steps=STEPS)
        record = session.record
        assert session.error is None and record.ran, (strategy, texts)
        if strategy == "mask_padding":  # zeroes the padding whatever it does to the score (random weights here)
            assert record.masked[0] > 0 and record.after[0] != record.before[0]
        else:  # these search for a lower score
            assert record.after[0] < record.before[0], strategy
        assert monitor.trace.per_step()[0].tolist() == pytest.approx(record.after, rel=1e-3), strategy


def test_an_encoder_not_laid_out_as_its_tokens_is_calibrated_but_not_explained(flow, tmp_path):
    patcher, text_clip = flow
    clip = PaddedEncoder(text_clip.text_encoder)
    sigmas = harness.schedule(patcher.model, STEPS)
    result = calibrate_loaded(patcher, clip, (3, 16, 16), sigmas, PROMPTS, tmp_path, cfg=3.0, band_prompts=0, seed=0,
                              batch_size=4, scheduler="normal")
    assert len(result.calibration.scores) == 4 * len(PROMPTS) and result.calibration.median > 1e-3
    session, out, plain, _ = monitored_run(patcher, clip, PROMPTS[0], calibration=lookup("auto", folders=[tmp_path]))
    assert torch.equal(out, plain) and session.final_verdicts()[0].label in ("ok", "flagged")
    noise = torch.zeros(1, 3, 16, 16)
    with torch.inference_mode(), pytest.raises(UnsupportedModel, match=f"gives {T5_LENGTH} positions"):
        ComfyDiffusionModel(patcher.model, sigmas, clip, noise).encode([TEXT])
    texts = []
    mitigation = MitigationSession(MitigationSettings(mitigation="always", strategy="remove_tokens"),
                                   emit=lambda e, d: None, show=lambda t, n: texts.append(t))
    with torch.inference_mode():
        pos = with_prompt_source(clip.encode_from_tokens_scheduled(clip.tokenize(TEXT)), TEXT, clip)
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = harness.sample(attach_mitigation(patcher, mitigation), noise, pos, neg, cfg=3.0, steps=STEPS)
    assert torch.equal(out, harness.sample(patcher, noise, pos, neg, cfg=3.0, steps=STEPS))
    assert mitigation.record is None and "no mitigation" in texts[-1] and f"{T5_LENGTH} positions" in texts[-1]


def test_numbers_among_the_model_inputs_ride_along_as_the_sampler_passes_them():
    """Lumina 2 and Z-Image take num_tokens as a plain number (a CONDConstant): batched by the core, handed back."""
    cond = lambda value: types.SimpleNamespace(cond=value)
    embedding, extra = split_model_conds({"c_crossattn": cond(torch.ones(1, 5, 4)), "num_tokens": cond(5),
                                          "y": cond(torch.zeros(1, 3))})
    assert embedding.shape == (1, 5, 4) and set(extra) == {"y", CONSTANT + "num_tokens"}
    batched = {k: torch.cat([v, v]) for k, v in extra.items()}  # as PromptEncoding batches rows
    inputs = model_inputs(batched)
    assert inputs["num_tokens"] == 5 and isinstance(inputs["num_tokens"], int) and inputs["y"].shape == (2, 3)
    with pytest.raises(UnsupportedModel, match="num_tokens differs"):
        model_inputs({CONSTANT + "num_tokens": torch.tensor([5, 7])})
    with pytest.raises(UnsupportedModel, match="'mask' is a str"):
        split_model_conds({"c_crossattn": cond(torch.ones(1, 5, 4)), "mask": cond("x")})


def test_the_embedded_guidance_is_read_from_the_conditioning_that_carries_one():
    guidance = types.SimpleNamespace(cond=torch.tensor([2.5]))
    assert embedded_guidance([{"model_conds": {}}, {"model_conds": {"guidance": guidance}}]) == 2.5
    assert embedded_guidance([{"model_conds": {}}]) is None and embedded_guidance(None) is None


def test_a_word_left_out_of_a_t5_stream_keeps_its_end_token_and_length():
    chunk = [(3, 1.0, 1), (9, 1.0, 1), (11094, 1.2, 2), (1, 1.0, 0), (0, 1.0, 0), (0, 1.0, 0)]  # ▁ a ▁purple </s> pads
    assert _without([chunk], {0, 1}, (0, 1.0, 0)) == [[(11094, 1.2, 2), (1, 1.0, 0), (0, 1.0, 0), (0, 1.0, 0),
                                                        (0, 1.0, 0), (0, 1.0, 0)]]
    assert _without([chunk[:4]], {2}, None) == [[(3, 1.0, 1), (9, 1.0, 1), (1, 1.0, 0)]]  # unpadded (Chroma's T5)
    clip = [(49406, 1.0, 0), (320, 1.0, 1), (5496, 1.2, 2), (49407, 1.0, 0), (49407, 1.0, 0)]
    assert _without([clip], {1}, (49407, 1.0, 0)) == [[(49406, 1.0, 0), (5496, 1.2, 2), (49407, 1.0, 0),
                                                        (49407, 1.0, 0), (49407, 1.0, 0)]]


class TwoStreamTokenizer:
    """A CLIP stream and a T5-like stream of the same text (as SD3's tokenizer gives "l" and "t5xxl")."""

    def __init__(self, clip):
        self.clip_l, self.t5xxl, self.hf = clip.tokenizer, self, clip.tokenizer.hf

    def untokenize(self, pairs):  # sentencepiece names: a word's first piece marked
        names = self.clip_l.untokenize(pairs)
        return [(pair, ("" if name.startswith("<") else WORD_START) + name.replace("</w>", ""))
                for pair, (_, name) in zip(pairs, names)]


class TwoStreamCLIP(harness.CLIP):
    """SD3's layout: the CLIP's 77 positions, then the T5 stream's (no BOS, end token, padding to 77)."""

    def __init__(self, text_encoder):
        super().__init__(text_encoder)
        self.tokenizer = TwoStreamTokenizer(harness.CLIP(text_encoder))

    def tokenize(self, text, return_word_ids=False):
        clip = super().tokenize(text, return_word_ids=True)["l"]
        words = [t for t in clip[0][1:] if t[2] > 0]
        t5 = words + [(1, 1.0, 0)] + [(0, 1.0, 0)] * (CHUNK - len(words) - 1)
        return {"l": clip, "t5xxl": [t5]}

    def encode_from_tokens_scheduled(self, tokens):
        [[clip, options]] = super().encode_from_tokens_scheduled({"l": tokens["l"]})
        with torch.no_grad():
            t5 = self.text_encoder(torch.tensor([[t[0] for t in tokens["t5xxl"][0]]])).last_hidden_state
        return [[torch.cat([clip, t5], dim=1), options]]


def test_a_clip_and_t5_conditioning_maps_each_word_to_both_streams_and_leaves_it_out_of_both(flow):
    patcher, text_clip = flow
    clip = TwoStreamCLIP(text_clip.text_encoder)
    sigmas = harness.schedule(patcher.model, STEPS)
    with torch.inference_mode():
        adapter = ComfyDiffusionModel(patcher.model, sigmas, clip, torch.zeros(1, 3, 16, 16))
        cond = adapter.encode([TEXT])
        groups = cond.word_groups(0)
        edited = adapter.encode_without(cond, [(0, groups[4])])
        typed = adapter.encode([TEXT.replace(" lighthouse", "")])
    assert cond.embedding.shape[1] == 2 * CHUNK and len(groups) == 6
    assert all(len(g) == 2 and g[0] < CHUNK <= g[1] for g in groups)  # the word in the CLIP and in the T5 part
    assert ["".join(cond.tokens[0][i] for i in g) for g in groups] == ["a", "purple", "ring", ",", "lighthouse",
                                                                       "poster"]
    torch.testing.assert_close(edited.embedding, typed.embedding)
    assert adapter.clip_positions_of(TEXT, 2 * CHUNK) == CHUNK
    texts = []
    auto = MitigationSession(MitigationSettings(mitigation="always", strategy="auto"), emit=lambda e, d: None,
                             show=lambda t, n: texts.append(t))
    with torch.inference_mode():
        pos = with_prompt_source(clip.encode_from_tokens_scheduled(clip.tokenize(TEXT)), TEXT, clip)
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    harness.sample(attach_mitigation(patcher, auto), torch.randn(1, 3, 16, 16), pos, neg, cfg=3.0, steps=STEPS)
    # SD3's default: the CLIP chunk's padding masked (after BOS, the prompt and the end-of-text), T5's untouched
    assert auto.error is None and auto.record.strategy == "mask_padding" and auto.record.ran and not auto.notes
    assert auto.record.masked == [CHUNK - 2 - int(cond.prompt_mask[0, :CHUNK].sum())]
