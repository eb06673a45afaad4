import json

import numpy as np
import pytest
import torch

from memoguard.calibration import Calibration, CalibrationError, CalibrationStore, default_benign_prompts, roc_auc, roc_curve, tpr_at_fpr
from memoguard.score import ScoreTrace
from memoguard.verdict import verdict_for


def test_round_trip_keeps_several_models(tmp_path):
    path = tmp_path / "cal.json"
    a = Calibration("model-a", list(np.linspace(0.1, 1.0, 50)), meta={"steps": 50})
    b = Calibration("model-b", list(np.linspace(1.0, 2.0, 20)), window=3)
    a.save(path)
    b.save(path)
    a2, b2 = Calibration.load(path, "model-a"), Calibration.load(path, "model-b")
    assert a2.scores == a.scores and a2.meta == {"steps": 50}
    assert b2.window == 3 and b2.threshold(0.05) == b.threshold(0.05)
    with pytest.raises(CalibrationError, match="holds 2 models"):
        Calibration.load(path)
    with pytest.raises(CalibrationError, match="no calibration for model 'model-c'"):
        Calibration.load(path, "model-c")


def test_threshold_respects_false_positive_rate():
    rng = np.random.default_rng(0)
    benign = rng.normal(size=1000)
    cal = Calibration("m", benign.tolist())
    for fpr in (0.01, 0.05, 0.2):
        thr = cal.threshold(fpr)
        assert (benign >= thr).mean() <= fpr
        assert (benign >= np.sort(benign)[-int(fpr * 1000) - 1]).mean() > fpr  # and is not looser than needed
    assert cal.percentile(float(np.median(benign))) == pytest.approx(50, abs=0.2)
    assert cal.percentile(10.0) == 100.0 and cal.percentile(-10.0) == 0.0


def test_bad_files_and_inputs(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="unreadable"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CalibrationError, match="not a MemoGuard calibration"):
        Calibration.load(tmp_path / "other.json")
    with pytest.raises(CalibrationError, match="at least 10"):
        Calibration("m", [1.0, float("nan")] * 5)
    with pytest.raises(CalibrationError, match="rate"):
        Calibration("m", list(range(20))).threshold(0)


def test_metrics_match_brute_force():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 80), rng.normal(0, 1, 300)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(pos, neg) == pytest.approx(brute)
    fpr, tpr = roc_curve(pos, neg)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    # TPR@1%FPR: largest threshold set flagging < 1% of negatives (3 of 300 -> at most 2)
    best = max(((pos >= t).mean() for t in np.r_[pos, neg] if (neg >= t).mean() < 0.01), default=0.0)
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(best)
    assert roc_auc([1, 2], [3, 4]) == 0.0 and roc_auc([3], [1]) == 1.0


def test_verdict_flags_by_threshold_and_reports_unavailable():
    import torch
    cal = Calibration("m", list(np.linspace(0, 1, 101)))
    trace = ScoreTrace(detector="magnitude")
    diff = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 2.0)])
    trace.record(0, diff)
    low, high = verdict_for(trace, cal, images=2)
    assert not low.flagged and high.flagged
    assert low.percentile == pytest.approx(50, abs=1) and high.percentile == 100
    assert "LIKELY MEMORIZED" in high.summary() and "set by hand" not in high.summary()
    # a threshold set by hand below every benign score: flagged at a low percentile, and the text says whose
    # threshold flagged it (it read "flagged, percentile 0.0" with nothing to explain it)
    cal_high = Calibration("m", list(np.linspace(5, 6, 101)))
    (by_hand,) = verdict_for(trace, cal_high, threshold=0.25, images=2)[:1]
    assert by_hand.flagged and by_hand.percentile == 0 and by_hand.manual
    assert "threshold 0.2500 (set by hand)" in by_hand.summary()
    empty = ScoreTrace()
    empty.mark_unavailable("score unavailable at cfg 1")
    (v,) = verdict_for(empty, cal, images=1)
    assert not v.available and "cfg 1" in v.summary()


def test_shipped_benign_prompts_are_a_few_hundred_distinct():
    prompts = default_benign_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)


# -- model identity, conditions, bands, the store ----------------------------------------------------------

def test_fingerprint_ignores_names_layouts_and_precision_but_not_weights():
    import torch
    from memoguard.identity import weights_fingerprint
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.GroupNorm(2, 8))
    lin = torch.nn.ModuleDict({"norm": torch.nn.GroupNorm(2, 8), "proj": torch.nn.Linear(8, 8)})
    with torch.no_grad():  # the same weights as a 1x1 conv and as a linear layer, under other names and order
        lin["proj"].weight.copy_(conv[0].weight.reshape(8, 8))
        lin["proj"].bias.copy_(conv[0].bias)
        lin["norm"].weight.copy_(conv[1].weight)
        lin["norm"].bias.copy_(conv[1].bias)
    key = weights_fingerprint(conv)
    assert key.startswith("unet-") and key == weights_fingerprint(lin) == weights_fingerprint(conv.half())
    assert key == weights_fingerprint(conv.to(torch.bfloat16))
    # a checkpoint kept in fp8 (Forge Neo and ComfyUI load them so) is keyed by the signs of what it holds
    fp8 = conv.to(torch.float8_e4m3fn)
    assert fp8[0].weight.dtype == torch.float8_e4m3fn
    assert weights_fingerprint(fp8).startswith("unet-") and weights_fingerprint(fp8) == weights_fingerprint(fp8.float())
    conv.float()
    with torch.no_grad():
        conv[0].weight.mul_(-1)
    assert weights_fingerprint(conv) != key


def test_band_interpolates_in_noise_level_and_refuses_outside():
    from memoguard.calibration import Band
    gaps = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [2.0, 3.0, 4.0]])
    band = Band.from_runs([10.0, 1.0, 0.1, 0.0][:3], gaps, fpr=0.01)
    logs = np.log(gaps)
    expected = np.exp(logs.mean(0) + 2.3263479 * logs.std(0, ddof=1))  # the 99 % normal quantile of the logs
    assert band.median == [2.0, 3.0, 4.0] and band.high == pytest.approx(expected.tolist())
    assert band.at(1.0) == pytest.approx((3.0, expected[1]))
    median, high = band.at(np.sqrt(10.0))  # halfway in log noise level
    assert median == pytest.approx(2.5) and high == pytest.approx((expected[0] + expected[1]) / 2)
    rng = np.random.default_rng(0)  # on log-normal runs the edge is exceeded at the stated rate at each step
    many = np.exp(rng.normal(np.log([0.02, 0.05, 0.1]), [0.1, 0.3, 0.5], size=(20000, 3)))
    wide = Band.from_runs([10.0, 1.0, 0.1], many[:2000], fpr=0.05)
    assert (many[2000:] > np.array(wide.high)).mean(0) == pytest.approx([0.05] * 3, abs=0.01)
    assert band.at(20.0) is None and band.at(0.05) is None
    last_clean = Band.from_runs([10.0, 1.0, 0.0], gaps)  # a schedule ending at the clean image
    assert last_clean.noise_levels == [10.0, 1.0]
    with pytest.raises(CalibrationError, match="decreasing"):
        Band([1.0, 2.0], [0, 0], [0, 0])


def test_a_flow_calibration_keeps_its_embedded_guidance_and_says_when_a_run_differs(tmp_path):
    """Flux dev gets its guidance as an input: every prediction, the first step's too, depends on it."""
    cal = Calibration("k", list(np.linspace(0.1, 0.2, 20)), conditions={"noise_level": 1.0, "prediction": "flow",
                                                                        "embedded_guidance": 3.5})
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert again.check("flow", 1.0, embedded_guidance=3.5) == [] and again.check("flow", 1.0) == []
    (note,) = again.check("flow", 1.0, embedded_guidance=2.0)
    assert "embedded guidance 3.5" in note and "uses 2" in note
    assert Calibration("k", [0.1] * 20).check(embedded_guidance=2.0) == []  # not recorded: not compared
    bad = json.loads((tmp_path / "c.json").read_text())
    next(iter(bad["models"].values()))["conditions"]["embedded_guidance"] = "high"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CalibrationError, match="embedded_guidance"):
        Calibration.load(tmp_path / "bad.json")


def test_conditions_pick_the_level_and_say_what_differs(tmp_path):
    cal = Calibration("k", list(np.linspace(0.1, 0.2, 20)), conditions={"noise_level": 14.6, "latent": [4, 64, 64],
                                                                        "prediction": "eps"},
                      other_levels={"11.0": list(np.linspace(1.0, 2.0, 20))})
    assert cal.check("eps", 14.7, [4, 64, 64]) == []
    notes = cal.check("v", 10.0, [4, 96, 64])
    assert len(notes) == 3 and "v-prediction" in notes[0] and "14.6" in notes[1] and "64x64" in notes[2]
    other = cal.at_noise_level(11.05)
    assert other.scores[0] == 1.0 and other.conditions["noise_level"] == 11.0 and other.check(noise_level=11.05) == []
    assert other.at_noise_level(14.6).scores == cal.scores  # and back
    assert cal.at_noise_level(5.0) is cal
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert again.other_levels == cal.other_levels and again.conditions == cal.conditions


def test_store_finds_by_key_falls_back_to_the_bundled_preset_and_reports_corruption(tmp_path, tiny_model):
    from memoguard.calibration import Band, CalibrationStore
    store = CalibrationStore(tmp_path)
    assert store.find("unet-0000000000000000") is None
    bundled = store.find(tiny_model.model_key)
    assert bundled is not None and bundled.band is not None and bundled.conditions["host"] == "diffusers"
    cal = Calibration("unet-1111111111111111", list(range(20)), band=Band([2.0, 1.0], [0.1, 0.2], [0.3, 0.4]))
    path = store.save(cal)
    assert path.name == "unet-1111111111111111.json"
    found = store.find("unet-1111111111111111")
    assert found.scores == cal.scores and found.band.at(1.5) is not None
    path.write_text("{truncated")
    with pytest.raises(CalibrationError, match="unreadable"):
        store.find("unet-1111111111111111")


def test_without_a_threshold_the_verdict_is_uncalibrated_never_ok():
    import torch
    trace = ScoreTrace(detector="magnitude")
    trace.record(0, torch.full((2, 1, 2, 2), 0.5))
    verdicts = verdict_for(trace, None, images=2)
    assert [v.label for v in verdicts] == ["uncalibrated", "uncalibrated"]
    assert verdicts[0].summary().startswith("uncalibrated: score 0.5000") and "calibrate" in verdicts[0].summary()
    assert "ok" not in verdicts[0].summary().split()
    cal = Calibration("m", list(np.linspace(0, 1, 101)))
    (v, _) = verdict_for(trace, cal, images=2, notes=["calibrated at another noise level"])
    assert v.label == "ok" and "another noise level" in v.summary()
    empty = ScoreTrace()
    empty.mark_unavailable("cfg 1")
    assert [v.label for v in verdict_for(empty, cal, images=3)] == ["unavailable"] * 3


def test_calibrate_runs_the_verdict_and_the_band_through_the_model(tiny_model):
    from memoguard.measure import calibrate, first_step_gaps
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "purple", "orange", "yellow")] * 2
    calls = []
    cal = calibrate(tiny_model, prompts, model_key="k", shape=tiny_model.latent_shape(), steps=6, band_prompts=3,
                    seeds=[0, 5], extra_timesteps=[999], batch_size=4, conditions={"host": "test"},
                    progress=lambda stage, done, total: calls.append((stage, done, total)))
    direct = first_step_gaps(tiny_model, prompts, [0, 5], tiny_model.latent_shape(), tiny_model.timesteps(6)[0])
    # every prompt x seed is a benign sample (a verdict judges one generation)
    assert cal.scores == pytest.approx(sorted(direct.reshape(-1).tolist()), rel=1e-5)  # batch sizes: last bits
    levels = [tiny_model.noise_level(t) for t in tiny_model.timesteps(6)]
    assert cal.band.noise_levels == pytest.approx(levels) and len(cal.band.high) == 6
    assert all(h >= m for h, m in zip(cal.band.high, cal.band.median))
    assert cal.conditions == {"host": "test", "noise_level": pytest.approx(levels[0]), "latent": [3, 16, 16],
                              "prediction": "eps", "detector": "detail_magnitude"}
    (level,) = cal.other_levels
    assert float(level) == pytest.approx(tiny_model.noise_level(999))
    assert ("band", 3, 3) in calls and ("first step", 12, 12) in calls


def test_a_band_measured_at_another_guidance_says_so():
    from memoguard.calibration import Band
    band = Band([2.0, 1.0], [0.1, 0.2], [0.3, 0.4], settings={"guidance": 3.0})
    cal = Calibration("k", list(range(20)), band=band)
    assert band.serves(3.0) and band.serves(None) and not band.serves(7.5)
    assert cal.check(guidance=3.0) == []
    (note,) = cal.check(guidance=7.5)
    assert "cfg 3" in note and "cfg 7.5" in note


def test_first_step_scores_with_the_shared_unconditional_half_equal_the_cfg_pairs(tiny_model):
    """FirstStep evaluates eps(x_T, "") once per seed and prompt length; each prompt x seed's score equals the
    one from its own CFG pair (one batched cond + uncond call), short and two-chunk prompts alike."""
    from memoguard.measure import first_step_gaps
    from memoguard.sampling import initial_noise
    from memoguard.score import detector_score
    prompts = ["a red circle", ", ".join(["a purple ring on a lighthouse poster"] * 12), "a small blue ring"]
    t = tiny_model.timesteps(50)[0]
    shared = first_step_gaps(tiny_model, prompts, [0, 3], tiny_model.latent_shape(), t)
    uncond = tiny_model.encode([""])
    for i, prompt in enumerate(prompts):
        cond = tiny_model.encode([prompt]).repeat_rows(2)
        x = initial_noise(tiny_model, tiny_model.latent_shape(), [0, 3])
        with torch.no_grad():
            pair = detector_score(*tiny_model.eps_pair(x, t, cond, uncond)).numpy()
        np.testing.assert_allclose(shared[i], pair, rtol=1e-5)
    assert tiny_model.encode([prompts[1]]).embedding.shape[1] == 2 * 77


def test_hostile_calibration_files_get_a_message_naming_the_field(tmp_path, hostile_calibration_files):
    """Every field of a file is checked on load: wrong types, NaN, sizes and truncation are one CalibrationError
    that names the field, never another exception and never a silently accepted value."""
    path = tmp_path / "unet-x.json"
    for label, content, words in hostile_calibration_files("unet-x"):
        path.write_bytes(content)
        for read in (lambda: Calibration.load(path), lambda: Calibration.find(path, "unet-x"),
                     lambda: CalibrationStore(tmp_path).locate("unet-x")):
            with pytest.raises(CalibrationError) as e:
                read()
            assert words in str(e.value) and str(path) in str(e.value), (label, str(e.value))


def test_an_oversized_calibration_file_is_refused_unread(tmp_path):
    from memoguard.calibration_schema import MAX_FILE_BYTES
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(CalibrationError, match="at most"):
        Calibration.load(path)


def test_a_valid_file_with_every_field_still_loads(tmp_path, valid_calibration_entry):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"format": 2, "models": {"unet-x": valid_calibration_entry}}))
    cal = Calibration.load(path)
    assert cal.window == 1 and cal.band is not None and len(cal.other_levels["11.0"]) == 20


def test_the_threshold_sits_between_benign_scores_not_on_one():
    """At 1 % of 100 scores the threshold lies halfway between the 99th and the 100th: the 99th prompt's verdict no
    longer flips when its score moves in the last float bits (it sat one float step under the threshold)."""
    from memoguard.calibration import threshold_at_fpr
    scores = [0.01 * i for i in range(1, 101)]
    cal = Calibration("m", scores)
    t = cal.threshold(0.01)
    assert t == pytest.approx((0.99 + 1.00) / 2)
    assert sum(s >= t for s in scores) == 1 and sum(s * (1 + 1e-6) >= t for s in scores) == 1
    assert threshold_at_fpr(scores, 0.001) == pytest.approx(1.005)  # above the highest, by half the last gap
    assert Calibration("m", [0.5] * 20).threshold(0.05) == np.nextafter(0.5, 1)  # ties: nothing between them
    for fpr in (0.01, 0.05, 0.2):
        assert sum(s >= cal.threshold(fpr) for s in scores) <= fpr * len(scores)
