"""memoguard.standalone.diffusers_guider in a real diffusers modular pipeline (StableDiffusionXLAutoBlocks) of tiny
random SDXL parts: CFG's latents bit-identical when only watching, the score of the predictions CFG is handed,
delayed guidance for the images that need it, and nothing raised into the pipeline."""
import pytest
import torch

from test_diffusers_hook import PROMPT, tiny_sdxl_pipeline

pytest.importorskip("diffusers.modular_pipelines")
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks  # noqa: E402

from memoguard.standalone.diffusers_guider import MemoGuardGuidance  # noqa: E402
from memoguard.score import step_score  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def modular(parts):
    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks.pop("decode")  # the tiny parts have no VAE: the pipeline returns latents
    pipe = blocks.init_pipeline()
    pipe.update_components(unet=parts.unet, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                           tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, scheduler=parts.scheduler)
    return pipe


def latents_of(pipe, guider, x):
    pipe.update_components(guider=guider)
    return pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, height=8, width=8,
                latents=x.clone(), num_images_per_prompt=x.shape[0], output="latents")


def start_noise(images=2):
    return torch.randn(images, 4, 8, 8, generator=torch.Generator().manual_seed(0))


class Recorded(ClassifierFreeGuidance):
    """Plain CFG that keeps what it was handed at each step."""

    seen = []

    def forward(self, pred_cond, pred_uncond=None):
        self.seen.append((int(self._timestep), pred_cond.clone(), pred_uncond.clone()))
        return super().forward(pred_cond, pred_uncond)


def test_watching_leaves_the_latents_bit_identical_and_scores_the_predictions_cfg_gets(modular):
    x = start_noise()
    Recorded.seen = []
    plain = latents_of(modular, Recorded(guidance_scale=5.0), x)
    guider = MemoGuardGuidance(guidance_scale=5.0).watching(modular, calibration=None)
    assert torch.equal(latents_of(modular, guider, x), plain)
    per_step = guider.recorder.trace.per_step()
    assert per_step.shape == (STEPS, 2) and len(Recorded.seen) == STEPS
    for step, (t, cond, uncond) in enumerate(Recorded.seen):  # eps-prediction: the RMS of eps_c - eps_u
        torch.testing.assert_close(per_step[step], step_score(cond - uncond), rtol=1e-5, atol=1e-7)
    assert [v.label for v in guider.recorder.verdicts()] == ["uncalibrated"] * 2


def test_delayed_guidance_for_the_images_over_the_threshold(modular):
    x = start_noise()
    watched = MemoGuardGuidance(guidance_scale=5.0).watching(modular, calibration=None)
    plain = latents_of(modular, watched, x)
    first = watched.recorder.trace.per_step()[0]
    high = int(first.argmax())
    threshold = float(first.mean())  # one image over it, one under
    guider = MemoGuardGuidance(guidance_scale=5.0, mitigation="auto", threshold=threshold, delay=0.5,
                               early_scale=0.0)
    steered = latents_of(modular, guider.watching(modular, calibration=None), x)
    assert guider.record.ran and guider.record.delay_steps == 2 and guider.record.strategy == "guidance_delay"
    assert guider.record.image_iterations[high] == 2 and guider.record.image_iterations[1 - high] == 0
    torch.testing.assert_close(guider.recorder.trace.per_step()[0], first)  # scored before it steers
    assert not torch.equal(steered[high], plain[high]) and torch.equal(steered[1 - high], plain[1 - high])
    unguided = latents_of(modular, ClassifierFreeGuidance(guidance_scale=5.0, start=0.5), x)  # diffusers' own start
    assert not torch.equal(unguided[high], steered[high])  # "no text guidance" is the unconditional prediction
    # the default schedule: opposite guidance, 0.2 of the steps at -3, for the same image only
    opposite = MemoGuardGuidance(guidance_scale=5.0, mitigation="auto", threshold=threshold)
    away = latents_of(modular, opposite.watching(modular, calibration=None), x)
    assert opposite.record.strategy == "opposite_guidance" and opposite.record.early_scale == -3.0
    assert opposite.record.image_iterations[high] == opposite.record.delay_steps == round(0.2 * STEPS)
    assert not torch.equal(away[high], steered[high]) and torch.equal(away[1 - high], plain[1 - high])
    nothing = MemoGuardGuidance(guidance_scale=5.0, mitigation="auto").watching(modular, calibration=None)
    assert torch.equal(latents_of(modular, nothing, x), plain)  # auto without a threshold: says so, changes nothing
    assert not nothing.record.ran and "no threshold" in nothing.record.reason


def test_a_failure_inside_memoguard_is_plain_cfg_and_an_unavailable_score(modular, monkeypatch):
    import memoguard.standalone.diffusers_hook as hook
    x = start_noise(1)
    plain = latents_of(modular, ClassifierFreeGuidance(guidance_scale=5.0), x)
    monkeypatch.setattr(hook, "eps_difference", lambda *a, **k: 1 / 0)
    guider = MemoGuardGuidance(guidance_scale=5.0, mitigation="always").watching(modular, calibration=None)
    assert torch.equal(latents_of(modular, guider, x), plain)
    (verdict,) = guider.recorder.verdicts()
    assert verdict.label == "unavailable" and "ZeroDivisionError" in verdict.summary()
