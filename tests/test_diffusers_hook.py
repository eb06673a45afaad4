"""memoguard.standalone.diffusers_hook on a real diffusers StableDiffusionPipeline (the bundled model)."""
import pytest
import torch

from memoguard.calibration import Calibration
from memoguard.resources import asset_path
from memoguard.sampling import initial_noise, sample
from memoguard.standalone.diffusers_hook import PipelineError, watch
from memoguard.standalone.diffusers_model import load_model

PROMPT = "a purple ring, lighthouse poster"
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.StableDiffusionPipeline.from_pretrained(
        str(asset_path("tiny-sd")), vae=None, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)


def run(pipe, latents, **kw):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents.clone(), height=128,
                width=128, output_type="latent", num_images_per_prompt=latents.shape[0], **kw).images


def test_scores_come_from_the_pipelines_own_cfg_pass_and_match_the_core(pipe):
    model = load_model()
    x = initial_noise(model, model.latent_shape(), [0, 1])
    plain = run(pipe, x)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with watch(pipe) as monitor:
        watched = run(pipe, x)
    handle.remove()
    assert torch.equal(plain, watched) and len(calls) == STEPS  # no extra UNet call, the same images
    cond, uncond = model.encode([PROMPT]).repeat_rows(2), model.encode([""])
    core = sample(model, cond, uncond, x, STEPS, 7.5).trace.per_step()
    got = monitor.trace.per_step()
    assert got.shape == (STEPS, 2)
    torch.testing.assert_close(got[0], core[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, core, rtol=2e-3, atol=1e-5)


def test_verdicts_are_per_image_and_use_the_calibration(pipe):
    model = load_model()
    x = initial_noise(model, model.latent_shape(), [0, 1, 2])
    with watch(pipe) as monitor:
        run(pipe, x)
    scores = monitor.trace.per_step()[0]
    assert [v.label for v in monitor.verdicts()] == ["uncalibrated"] * 3
    threshold = float(scores.median())
    calibration = Calibration("m", [threshold * k / 10 for k in range(1, 21)])
    with watch(pipe, calibration=calibration, threshold=threshold) as monitor:
        run(pipe, x)
    verdicts = monitor.verdicts()
    assert [v.flagged for v in verdicts] == [bool(s >= threshold) for s in scores.tolist()]
    assert any(v.flagged for v in verdicts) and not all(v.flagged for v in verdicts)
    with watch(pipe) as monitor:  # guidance 1: the pipeline skips the negative prompt, there is no gap
        pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, latents=x.clone(), height=128, width=128,
             output_type="latent", num_images_per_prompt=3)
    assert [v.label for v in monitor.verdicts()] == ["unavailable"] * 3
    with pytest.raises(PipelineError, match="no pipeline call"):
        watch(pipe).verdicts()
