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
    with watch(pipe, calibration=None) as monitor:
        run(pipe, x)
    scores = monitor.trace.per_step()[0]
    assert [v.label for v in monitor.verdicts()] == ["uncalibrated"] * 3
    with watch(pipe) as monitor:  # by default, the calibration made for these weights (the bundled preset here)
        run(pipe, x)
    bundled = Calibration.load(asset_path("calibration.json"))
    assert [v.threshold for v in monitor.verdicts()] == [bundled.threshold(0.01)] * 3
    threshold = float(scores.median())
    calibration = Calibration("m", [threshold * k / 10 for k in range(1, 21)], conditions={"detector": "detail_magnitude"})
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


def tiny_sdxl_pipeline():
    """A StableDiffusionXLPipeline of random tiny parts (two CLIP encoders, a text_time UNet), no VAE."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=49408, projection_dim=32)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    tokenizer = CLIPTokenizer.from_pretrained(str(asset_path("tiny-sd", "tokenizer")))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=CLIPTextModel(text).eval(),
                                               text_encoder_2=CLIPTextModelWithProjection(text).eval(),
                                               tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet.eval(),
                                               scheduler=scheduler, force_zeros_for_empty_prompt=False)


def test_sdxl_pipeline_scores_match_the_cores_model_of_the_same_parts():
    from memoguard.standalone.diffusers_model import DiffusersModel
    xl = tiny_sdxl_pipeline()
    model = DiffusersModel(xl.unet, [xl.text_encoder, xl.text_encoder_2], [xl.tokenizer, xl.tokenizer_2],
                           xl.scheduler)
    x = initial_noise(model, model.latent_shape(), [0, 1])
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=8, width=8, output_type="latent",
              num_images_per_prompt=2, negative_prompt="")
    plain = xl(PROMPT, latents=x.clone(), **kw).images
    with watch(xl) as monitor:
        watched = xl(PROMPT, latents=x.clone(), **kw).images
    assert torch.equal(plain, watched)
    cond, uncond = model.encode([PROMPT]).repeat_rows(2), model.encode([""])
    core = sample(model, cond, uncond, x, 3, 5.0).trace.per_step()
    torch.testing.assert_close(monitor.trace.per_step()[0], core[0], rtol=1e-4, atol=1e-6)
    assert len(monitor.verdicts()) == 2


@pytest.mark.parametrize("strategy", ["mask_padding", "remove_tokens", "minimize"])
def test_a_mitigated_prompt_runs_through_the_pipeline_on_the_same_latents(pipe, strategy):
    from memoguard.standalone.diffusers_hook import mitigated_prompt
    model = load_model()
    x = initial_noise(model, model.latent_shape(), [0, 1])
    kwargs, record = mitigated_prompt(pipe, PROMPT, x, STEPS, 7.5, strategy=strategy, mode="always", target=0.0,
                                      lr=0.1, max_iters=5)
    assert record.strategy == strategy and record.ran and all(a < b for a, b in zip(record.after, record.before))
    with watch(pipe) as monitor:
        pipe(latents=x.clone(), num_inference_steps=STEPS, guidance_scale=7.5, height=128, width=128,
             output_type="latent", **kwargs)
    torch.testing.assert_close(monitor.trace.per_step()[0], torch.tensor(record.after), rtol=1e-3, atol=1e-6)
    with pytest.raises(Exception, match="changes the guidance scale per step"):
        mitigated_prompt(pipe, PROMPT, x, STEPS, 7.5, strategy="guidance_delay")


def test_the_hook_never_raises_into_the_pipeline_call(pipe, monkeypatch):
    """Anything the hook cannot read (here: an odd guided batch, then a failure inside the score) makes the score
    unavailable with the reason; the pipeline's images are the plain ones."""
    model = load_model()
    x = initial_noise(model, model.latent_shape(), [0])
    plain = run(pipe, x)
    import memoguard.standalone.diffusers_hook as hook
    monitor = watch(pipe, calibration=None)
    with pytest.raises(PipelineError, match="not \\[negative; prompt\\] pairs"):
        monitor._read((None, torch.tensor(999)), {}, (torch.zeros(3, 3, 16, 16),))
    monkeypatch.setattr(hook, "eps_difference", lambda *a, **k: 1 / 0)
    with watch(pipe, calibration=None) as monitor:
        watched = run(pipe, x)
    assert torch.equal(watched, plain)
    (verdict,) = monitor.verdicts()
    assert verdict.label == "unavailable" and "ZeroDivisionError" in verdict.summary()


def test_unknown_pipeline_layouts_are_refused_up_front(pipe):
    class OtherPipeline:
        scheduler, unet = pipe.scheduler, pipe.unet
    with pytest.raises(PipelineError, match="not a pipeline whose guided batch MemoGuard knows"):
        watch(OtherPipeline())
