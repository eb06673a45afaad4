import json

import numpy as np
import pytest

from memoguard.calibration import Calibration, CalibrationError, default_benign_prompts, roc_auc, roc_curve, tpr_at_fpr
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
    trace = ScoreTrace()
    diff = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 2.0)])
    trace.record(0, diff)
    low, high = verdict_for(trace, cal)
    assert not low.flagged and high.flagged
    assert low.percentile == pytest.approx(50, abs=1) and high.percentile == 100
    assert "LIKELY MEMORIZED" in high.summary()
    empty = ScoreTrace()
    empty.mark_unavailable("score unavailable at cfg 1")
    (v,) = verdict_for(empty, cal)
    assert not v.available and "cfg 1" in v.summary()


def test_shipped_benign_prompts_are_a_few_hundred_distinct():
    prompts = default_benign_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
