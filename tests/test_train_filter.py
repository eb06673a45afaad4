"""The training-time memorization filter: thresholds, logging, skips, and that it never alters
the gradients of the samples it keeps (checked on the bundled model's real UNet architecture)."""
import math

import pytest
import torch
import torch.nn.functional as F

from memoguard.calibration import Calibration
from memoguard.train_filter import MemorizationFilter, TimestepReference, gaps_from_predictions

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def unet():
    from memoguard.tiny.train import build_models
    torch.manual_seed(0)
    return build_models()[0]


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 77, 64, generator=g), torch.randn(n, 3, 16, 16, generator=g))


def per_sample_mse(pred, target):
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, **tol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tau", [-1.0, 0.0, float("nan"), float("inf"), "0.3", True, None])
def test_bad_tau_is_refused_with_a_clear_message(tau):
    with pytest.raises(ValueError, match="tau|exactly one"):
        MemorizationFilter(tau)


def test_threshold_sources_are_exclusive_and_checked():
    with pytest.raises(ValueError, match="exactly one"):
        MemorizationFilter(0.3, percentile=90)
    for bad in (0, 100, float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            MemorizationFilter(percentile=bad)


def test_fixed_tau_drops_gaps_at_or_above_tau_and_non_finite_ones():
    filt = MemorizationFilter(tau=0.35)
    keep = filt.keep_mask(torch.tensor([0.1, 0.35, float("nan"), 0.3, 0.9]))
    assert keep.tolist() == [True, False, False, True, False]
    log = filt.last
    assert (log.samples, log.kept, log.dropped, log.skipped, log.tau) == (5, 2, 3, False, 0.35)
    assert log.gap_min == pytest.approx(0.1) and log.gap_max == pytest.approx(0.9)
    assert log.gap_mean == pytest.approx((0.1 + 0.35 + 0.3 + 0.9) / 4)
    assert log.gap_dropped_mean == pytest.approx((0.35 + 0.9) / 2)
    assert filt.last.to_dict()["memo_filter/dropped"] == 3
    assert filt.stats.drop_rate == pytest.approx(3 / 5)


def test_percentile_mode_keeps_everything_while_warming_up_then_drops_the_top():
    filt = MemorizationFilter(percentile=75, warmup_steps=2)
    for _ in range(2):
        assert filt.keep_mask(torch.arange(1.0, 5.0)).all() and filt.last.tau is None
    keep = filt.keep_mask(torch.tensor([1.0, 2.0, 3.0, 4.5]))
    assert filt.last.tau == pytest.approx(torch.tensor([1.0, 2, 3, 4] * 2).quantile(0.75).item())
    assert keep.tolist() == [True, True, True, False]


def test_calibration_gives_its_threshold_at_the_requested_rate(tmp_path):
    cal = Calibration("tiny", [0.01 * i for i in range(1, 101)])
    cal.save(tmp_path / "cal.json")
    filt = MemorizationFilter(calibration=Calibration.load(tmp_path / "cal.json"), fpr=0.05)
    assert filt.tau == pytest.approx(cal.threshold(0.05))
    assert filt.keep_mask(torch.tensor([0.5, 0.99])).tolist() == [True, False]


def test_timestep_reference_holds_the_median_gap_of_each_band():
    t = torch.arange(1000)
    gaps = 0.2 - 0.15 * t / 1000  # ordinary gaps fall with t, as on real models
    ref = TimestepReference.fit(gaps, t, bands=4)
    expected = [float(gaps[a:a + 250].median()) for a in (0, 250, 500, 750)]
    assert ref.medians == pytest.approx(expected)
    rel = ref.relative(torch.tensor([0.2, 0.2]), torch.tensor([10, 990]))
    assert rel.tolist() == pytest.approx([0.2 / expected[0], 0.2 / expected[3]])


def test_with_a_reference_one_tau_drops_unusual_gaps_at_every_timestep(tmp_path):
    ref = TimestepReference([0.1, 0.02])  # ordinary gaps: 0.1 at t < 500, 0.02 above
    ref.save(tmp_path / "ref.json")
    filt = MemorizationFilter(tau=2.0, reference=TimestepReference.load(tmp_path / "ref.json"))
    # raw 0.15 at small t is ordinary-ish (1.5x); raw 0.05 at large t is 2.5x the ordinary gap there
    keep = filt.keep_mask(torch.tensor([0.15, 0.05, 0.03]), torch.tensor([100, 900, 600]))
    assert keep.tolist() == [True, False, True]
    assert filt.last.gap_max == pytest.approx(2.5)
    with pytest.raises(ValueError, match="timesteps"):
        filt.keep_mask(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="one timestep per gap"):
        filt.keep_mask(torch.tensor([0.1, 0.2]), torch.tensor([5]))


def test_timestep_reference_refuses_thin_bands_and_bad_medians():
    with pytest.raises(ValueError, match="band 3 of 4"):
        TimestepReference.fit(torch.rand(100), torch.randint(0, 700, (100,)), bands=4)
    for bad in ([], [0.1, 0.0], [0.1, float("nan")]):
        with pytest.raises(ValueError, match="finite numbers > 0"):
            TimestepReference(bad)


def test_a_key_dropped_far_more_often_than_the_nominal_rate_is_barred_and_ordinary_ones_are_not():
    cal = Calibration("tiny", [0.01 * i for i in range(1, 101)])  # fpr 0.05: tau ~0.95
    filt = MemorizationFilter(calibration=cal, fpr=0.05, bar_alpha=1e-4, warmup_steps=0)
    high, low = torch.tensor(0.99), torch.tensor(0.1)
    for step in range(200):  # "ordinary" is dropped exactly at the nominal 5 %, "copied" every third visit
        gaps = torch.stack([high if step % 20 == 0 else low, high if step % 3 == 0 else low, low])
        keep = filt.keep_mask(gaps, keys=["ordinary", "copied", None])
    assert "ordinary" not in filt.barred and "copied" in filt.barred
    barred_at = filt.barred["copied"]
    assert 0 < barred_at < 60
    # once barred, a copied sample is dropped even with an ordinary gap; None keys are never barred
    keep = filt.keep_mask(torch.tensor([0.1, 0.1, 0.1]), keys=["ordinary", "copied", None])
    assert keep.tolist() == [True, False, True]
    assert (filt.last.dropped_by_key, filt.last.barred_keys) == (1, 1)
    assert filt.barred["copied"] == barred_at


def test_keys_are_not_counted_during_the_warm_up():
    cal = Calibration("tiny", [0.01 * i for i in range(1, 101)])
    filt = MemorizationFilter(calibration=cal, fpr=0.05, bar_alpha=1e-4, warmup_steps=10)
    for _ in range(10):  # a caption the model has not learned yet: high gap at first
        filt.keep_mask(torch.tensor([0.99]), keys=["new words"])
    assert filt.barred == {} and filt.key_counts == {}
    for _ in range(10):
        filt.keep_mask(torch.tensor([0.99]), keys=["new words"])
    assert "new words" in filt.barred


def test_barring_needs_a_nominal_rate_and_one_key_per_sample():
    with pytest.raises(ValueError, match="nominal drop rate"):
        MemorizationFilter(tau=0.3, bar_alpha=1e-4)
    with pytest.raises(ValueError, match="bar_alpha"):
        MemorizationFilter(percentile=95, bar_alpha=1.5)
    filt = MemorizationFilter(percentile=95, warmup_steps=0, bar_alpha=1e-4)
    assert filt.nominal_drop_rate == pytest.approx(0.05)
    with pytest.raises(ValueError, match="one key per sample"):
        filt.keep_mask(torch.tensor([0.1, 0.2]), keys=["a"])


def test_empty_batch_and_all_dropped_batch_are_clean_skips():
    filt = MemorizationFilter(tau=0.2)
    keep = filt.keep_mask(torch.empty(0))
    assert keep.shape == (0,) and filt.last.skipped and math.isnan(filt.last.gap_mean)
    assert filt.masked_loss(torch.empty(0), keep) is None
    keep = filt.keep_mask(torch.tensor([0.5, 0.7]))
    assert filt.masked_loss(torch.tensor([1.0, 2.0], requires_grad=True), keep) is None
    assert (filt.stats.steps, filt.stats.skipped_steps, filt.stats.dropped) == (2, 2, 2)


def test_masked_loss_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="per-sample loss"):
        MemorizationFilter.masked_loss(torch.ones(4, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool keep-mask"):
        MemorizationFilter.masked_loss(torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        MemorizationFilter.masked_loss(torch.ones(2), torch.ones(2, dtype=torch.bool), reduction="max")


def test_gaps_are_the_rms_of_the_eps_difference_in_every_parameterization():
    c, u = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    expected = (c - u).flatten(1).norm(dim=1) / math.sqrt(48)
    torch.testing.assert_close(gaps_from_predictions(c, u), expected)
    torch.testing.assert_close(gaps_from_predictions(c, u, "v", alpha=0.5), 0.5 * expected)
    torch.testing.assert_close(gaps_from_predictions(c, u, "x0", alpha=1.0, sigma=2.0), 0.5 * expected)


def test_masked_loss_and_unet_gradients_equal_those_of_the_kept_subset(unet):
    x, t, emb, target = batch(6, seed=1)
    keep = torch.tensor([True, False, True, True, False, True])
    unet.zero_grad()
    loss = MemorizationFilter.masked_loss(per_sample_mse(unet(x, t, encoder_hidden_states=emb).sample, target), keep)
    loss.backward()
    filtered = grads(unet)
    unet.zero_grad()
    subset = per_sample_mse(unet(x[keep], t[keep], encoder_hidden_states=emb[keep]).sample, target[keep]).mean()
    subset.backward()
    torch.testing.assert_close(loss, subset)
    assert_same_grads(filtered, grads(unet))


@pytest.mark.parametrize("criterion", [torch.nn.MSELoss(), torch.nn.L1Loss(), torch.nn.HuberLoss()])
def test_kept_gradient_under_a_batch_mean_loss_gives_the_kept_subsets_gradients(unet, criterion):
    """What ComfyUI's training node does: criterion(prediction, target) over the whole batch, no hook at the loss."""
    from memoguard.train_filter import kept_gradient
    x, t, emb, target = batch(6, seed=4)
    keep = torch.tensor([True, False, True, True, False, True])
    unet.zero_grad()
    pred = unet(x, t, encoder_hidden_states=emb).sample
    adjusted = kept_gradient(pred, keep)
    assert torch.equal(adjusted, pred)  # the value the trainer sees and logs is unchanged
    criterion(adjusted, target).backward()
    filtered = grads(unet)
    unet.zero_grad()
    criterion(unet(x[keep], t[keep], encoder_hidden_states=emb[keep]).sample, target[keep]).backward()
    assert_same_grads(filtered, grads(unet), rtol=1e-4, atol=1e-7)
    unet.zero_grad()  # nothing kept: backward runs, every gradient is zero
    criterion(kept_gradient(unet(x, t, encoder_hidden_states=emb).sample, torch.zeros(6, dtype=torch.bool)),
              target).backward()
    assert all(float(g.abs().max()) == 0.0 for g in grads(unet).values())
    with pytest.raises(ValueError, match="bool keep-mask"):
        kept_gradient(pred, torch.ones(5, dtype=torch.bool))


def test_relative_to_ordinary_drops_the_given_share_of_the_gaps_it_was_fitted_on():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (2000,), generator=g)
    gaps = (1.0 + torch.rand(2000, generator=g)) * (1100 - t) / 1000  # the ordinary gap falls with t
    filt = MemorizationFilter.relative_to_ordinary(gaps, t, 0.05, bar_alpha=1e-4, warmup_steps=0)
    dropped = 1 - filt.keep_mask(gaps, t).float().mean()
    assert abs(float(dropped) - 0.05) < 0.005 and filt.reference is not None and filt.bar_alpha == 1e-4
    # a gap twice the ordinary one at its timestep is dropped at every timestep, small t or large
    assert not filt.keep_mask(3.0 * (1100 - torch.tensor([50, 950])) / 1000, torch.tensor([50, 950])).any()


def test_gradient_accumulation_with_sum_reduction_equals_one_pass_over_the_kept_samples(unet):
    x, t, emb, target = batch(8, seed=2)
    keep = torch.tensor([True, True, False, True, False, False, False, False])  # 2nd micro-batch: all dropped
    unet.zero_grad()
    kept = 0
    for part in (slice(0, 4), slice(4, 8)):
        pred = unet(x[part], t[part], encoder_hidden_states=emb[part]).sample
        loss = MemorizationFilter.masked_loss(per_sample_mse(pred, target[part]), keep[part], reduction="sum")
        if loss is not None:
            loss.backward()
            kept += int(keep[part].sum())
    for p in unet.parameters():
        if p.grad is not None:
            p.grad.div_(kept)
    accumulated = grads(unet)
    unet.zero_grad()
    per_sample_mse(unet(x[keep], t[keep], encoder_hidden_states=emb[keep]).sample, target[keep]).mean().backward()
    assert_same_grads(accumulated, grads(unet))


def test_under_autocast_gaps_are_float32_and_kept_gradients_match_the_subset(unet):
    x, t, emb, target = batch(6, seed=3)
    with torch.no_grad():
        reference = gaps_from_predictions(unet(x, t, encoder_hidden_states=emb).sample,
                                          unet(x, t, encoder_hidden_states=torch.zeros_like(emb)).sample)
    filt = MemorizationFilter(tau=float(reference.median()))
    unet.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = unet(x, t, encoder_hidden_states=emb).sample
        with torch.no_grad():
            pred_u = unet(x, t, encoder_hidden_states=torch.zeros_like(emb)).sample
        gaps = gaps_from_predictions(pred, pred_u)
        keep = filt.keep_mask(gaps)
        loss = filt.masked_loss(per_sample_mse(pred, target), keep)
    assert pred.dtype == torch.bfloat16 and gaps.dtype == torch.float32
    torch.testing.assert_close(gaps, reference, rtol=0.05, atol=1e-3)
    assert 0 < int(keep.sum()) < len(keep)
    loss.backward()
    filtered = grads(unet)
    unet.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_sample_mse(unet(x[keep], t[keep], encoder_hidden_states=emb[keep]).sample, target[keep]).mean().backward()
    assert_same_grads(filtered, grads(unet), rtol=0.05, atol=1e-4)


def test_readme_lora_loop_trains_only_the_adapter_on_the_kept_samples(unet):
    """README's peft example: the gap is the adapted model's; only LoRA weights learn, from kept samples only."""
    peft = pytest.importorskip("peft")
    import copy
    lora_unet = copy.deepcopy(unet)
    lora_unet.requires_grad_(False)
    lora_unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    noisy, t, cond, noise = batch(6, seed=4)
    empty = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(5))

    def lora_step(x, ts, c, target, filt):
        lora_unet.zero_grad(set_to_none=True)
        model_pred = lora_unet(x, ts, c).sample
        with torch.no_grad():
            pred_u = lora_unet(x, ts, empty.expand_as(c)).sample
        keep = filt.keep_mask(gaps_from_predictions(model_pred, pred_u))
        loss = filt.masked_loss(F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)), keep)
        loss.backward()
        return keep, {n: p.grad.clone() for n, p in lora_unet.named_parameters() if p.grad is not None}

    with torch.no_grad():
        gaps = gaps_from_predictions(lora_unet(noisy, t, cond).sample, lora_unet(noisy, t, empty.expand_as(cond)).sample)
    tau = float(gaps.median())  # about half the batch is dropped
    keep, filtered = lora_step(noisy, t, cond, noise, MemorizationFilter(tau=tau))
    assert 0 < int(keep.sum()) < 6
    assert filtered and all("lora" in name for name in filtered)
    _, subset = lora_step(noisy[keep], t[keep], cond[keep], noise[keep], MemorizationFilter(tau=1e9))
    assert_same_grads(filtered, subset, rtol=1e-4, atol=1e-7)
