"""MemoGuard Training Filter against the stand-ins: the filter is measured on the dataset before training, sits in
the model's function wrapper, leaves sampling untouched, gives the training step the kept samples' gradient,
names barred captions by their images, and a failure leaves training unfiltered with the reason in the report."""
import importlib
import json

import pytest
import torch

from memoguard.train_filter import MemorizationFilter
from . import harness

CAPTIONS = ["a red circle", "a blue square", "a green ring, velvet manifesto", "a purple cross"]


@pytest.fixture(scope="module")
def models():
    return harness.tiny_unet()


@pytest.fixture()
def setup(models):
    unet, text_encoder = models
    patcher, clip = harness.ModelPatcher(harness.BaseModel(unet)), harness.CLIP(text_encoder)
    torch.manual_seed(0)
    images = [2, 0, 1, 2, 3, 2, 0, 2, 1, 2]  # caption index of each dataset image: caption 2 five times
    latents = torch.randn(len(images), 3, 16, 16)
    encoded = [clip.encode_from_tokens_scheduled(clip.tokenize(c))[0] for c in CAPTIONS]
    positive = [encoded[i] for i in images]
    with harness.comfy_api_stand_in():
        module = importlib.import_module("nodes.nodes_training_filter")
        (filtered,) = module.MemoGuardTrainingFilter.execute([patcher], [clip], [{"samples": latents}], positive,
                                                              reference_samples=[160]).args
        yield module, patcher, filtered, latents, positive, images


def training_step(patcher, latents, positive, rows, sigma):
    """One call of the model as Train LoRA makes it (batch 1 per caption here), with the UNet's gradient."""
    unet = patcher.model.diffusion_model
    unet.zero_grad()
    unet.requires_grad_(True)
    try:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))[rows]  # each image's own
        s = torch.full((len(rows),), sigma)
        x = patcher.model.model_sampling.noise_scaling(s, noise, latents[rows])
        cond = torch.cat([positive[r][0] for r in rows])
        conds = [[{"model_conds": {"c_crossattn": harness.CONDCrossAttn(cond)}}]]
        (pred,) = harness.calc_cond_batch(patcher.model, conds, x, s, patcher.model_options)
        torch.nn.functional.mse_loss(pred, latents[rows]).backward()
        return pred.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    finally:
        unet.requires_grad_(False)


def test_the_filter_sits_in_the_wrapper_and_sampling_is_untouched(setup):
    module, patcher, filtered, latents, positive, images = setup
    hook = filtered.model_options["model_function_wrapper"]
    assert isinstance(hook, module.TrainingFilterHook) and "model_function_wrapper" not in patcher.model_options
    # measured before training: the reference per timestep band and tau at 5 % of the reference samples dropped
    assert hook.filter.reference is not None and len(hook.filter.reference.medians) == 10
    assert hook.filter.nominal_drop_rate == 0.05 and hook.filter.bar_alpha == 1e-4
    # the dataset's duplicated caption is one key, naming its five images
    assert sorted(hook.images_of_key.values()) == [[0, 3, 5, 7, 9], [1, 6], [2, 8], [4]]
    inputs = (torch.randn(1, 3, 16, 16), positive[0][0], positive[1][0])
    with torch.no_grad():
        assert torch.equal(harness.sample(filtered, *inputs, steps=3), harness.sample(patcher, *inputs, steps=3))
    assert hook.filter.stats.steps == 0  # sampling (no gradients) never reached the filter
    assert hook.filter is filtered.clone().model_options["model_function_wrapper"].filter  # clones share it


def test_a_training_step_gets_the_kept_samples_gradient(setup):
    module, patcher, filtered, latents, positive, _ = setup
    hook = filtered.model_options["model_function_wrapper"]
    rows = [0, 1, 2, 4]
    plain_pred, plain = training_step(patcher, latents, positive, rows, 2.0)
    hook.filter = MemorizationFilter(tau=1e9)  # everything kept: the plain step
    pred, kept_all = training_step(filtered, latents, positive, rows, 2.0)
    assert torch.equal(pred, plain_pred) and plain.keys() == kept_all.keys()
    for name in plain:
        torch.testing.assert_close(kept_all[name], plain[name])
    hook.filter = MemorizationFilter(tau=1e-9)  # everything dropped: no gradient, and backward still runs
    _, none = training_step(filtered, latents, positive, rows, 2.0)
    assert all(float(g.abs().max()) == 0 for g in none.values())
    assert hook.filter.stats.samples == 4 and hook.filter.stats.dropped == 4
    # one sample dropped by its gap: the gradient of the other three alone
    hook.filter = MemorizationFilter(tau=1e9)
    gaps = []
    keep_mask = hook.filter.keep_mask
    hook.filter.keep_mask = lambda g, t, keys: (gaps.append(g), keep_mask(g, t, keys))[1] & torch.tensor(
        [True, False, True, True])
    _, three = training_step(filtered, latents, positive, rows, 2.0)
    _, subset = training_step(patcher, latents, positive, [0, 2, 4], 2.0)
    for name in subset:
        torch.testing.assert_close(three[name], subset[name], rtol=1e-4, atol=1e-6)
    assert gaps[0].shape == (4,) and bool((gaps[0] > 0).all())


def test_a_caption_dropped_too_often_is_barred_and_the_report_names_its_images(setup):
    module, patcher, filtered, latents, positive, images = setup
    hook = filtered.model_options["model_function_wrapper"]
    hook.filter = MemorizationFilter(percentile=90, warmup_steps=0, bar_alpha=1e-3)
    duplicated, other = images.index(2), images.index(0)
    for step in range(40):  # the duplicated caption's samples at a high noise level, another's at a low one
        training_step(filtered, latents, positive, [duplicated], 14.0)
        training_step(filtered, latents, positive, [other], 0.05)
    report = json.loads(module.MemoGuardTrainingFilterReport.execute(filtered, 5).args[0])
    assert [b["images"] for b in report["barred"]] == [[0, 3, 5, 7, 9]]
    text = module.MemoGuardTrainingFilterReport.execute(filtered, 5).ui["memoguard_filter_report"][0]
    assert "1 caption(s) barred" in text and "images 0, 3, 5, 7, 9 (5 with this caption)" in text
    assert report["steps"] == 80 and report["error"] is None


def test_a_failure_leaves_training_unfiltered_and_the_report_says_why(setup):
    module, patcher, filtered, latents, positive, _ = setup
    hook = filtered.model_options["model_function_wrapper"]
    hook.empty_embedding = hook.empty_embedding[:, :5]  # a length no caption pairs with
    plain_pred, plain = training_step(patcher, latents, positive, [0, 1], 2.0)
    pred, got = training_step(filtered, latents, positive, [0, 1], 2.0)
    assert torch.equal(pred, plain_pred)
    for name in plain:
        torch.testing.assert_close(got[name], plain[name])
    text = module.MemoGuardTrainingFilterReport.execute(filtered, 5).ui["memoguard_filter_report"][0]
    assert text.startswith("the filter failed and training went on unfiltered: ValueError")
    assert "no MemoGuard Training Filter" in module.MemoGuardTrainingFilterReport.execute(patcher, 5).ui[
        "memoguard_filter_report"][0]


def test_captions_must_match_the_images(setup):
    module, patcher, _, latents, positive, _ = setup
    with pytest.raises(ValueError, match="3 captions for 10 images"):
        module.MemoGuardTrainingFilter.execute([patcher], [None], [{"samples": latents}], positive[:3])
