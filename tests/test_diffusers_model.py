"""The standalone loading path and prompt encoding, on real diffusers/transformers classes."""
import shutil

import pytest
import torch

from memoguard.errors import ModelLoadError
from memoguard.standalone.diffusers_model import BUNDLED_MODEL, load_model
from memoguard.standalone.pipeline import first_step_scores, generate
from memoguard.sampling import initial_noise, sample


def test_bundled_folder_loads_with_the_standard_diffusers_api():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    # a pixel-space model: no VAE (model_index.json says null), nothing to check for safety
    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED_MODEL, local_files_only=True, vae=None, safety_checker=None,
                                                   feature_extractor=None, image_encoder=None)
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    assert isinstance(DDIMScheduler.from_config(pipe.scheduler.config), DDIMScheduler)


def test_long_prompts_are_chunked_with_bos_and_eos(random_model):
    words = " ".join(["red"] * 100)
    enc = random_model.encode([words, "a blue ring"])
    assert enc.embedding.shape[:2] == (2, 154)
    assert enc.prompt_mask[0].sum() == 100 and enc.prompt_mask[1].sum() == 3
    assert enc.frozen_mask[0].nonzero().flatten().tolist() == [0, 77]  # one BOS per chunk
    assert enc.tokens[0][0] == "<|startoftext|>" and enc.tokens[0][76] == "<|endoftext|>"
    assert enc.tokens[0][77] == "<|startoftext|>"
    # the second prompt's first chunk is encoded exactly as when it is alone
    alone = random_model.encode(["a blue ring"])
    torch.testing.assert_close(enc.embedding[1, :77], alone.embedding[0])


@pytest.mark.parametrize("tokens, padded", [(76, False), (151, True)])
def test_a_prompt_that_loses_a_chunk_is_the_prompt_typed_alone_or_marked_padded(random_model, tokens, padded):
    """Left out of a 76-token prompt, a word takes it to one chunk: repeated whole, cross-attention sees exactly the
    prompt typed alone (the same first-step prediction); 151 -> 150 tokens (3 chunks -> 2) cannot repeat into 3 and
    is padded with the empty chunk, said in `padded`."""
    words = ["red"] * (tokens - 1) + ["ring"]
    cond = random_model.encode([" ".join(words)])
    shorter = random_model.encode_without(cond, [(0, cond.word_groups(0)[-1])])
    alone = random_model.encode([" ".join(words[:-1])])
    assert shorter.embedding.shape == cond.embedding.shape and shorter.padded == ([True] if padded else None)
    assert shorter.word_groups(0) == alone.word_groups(0) and shorter.prompt_tokens(0) == alone.prompt_tokens(0)
    x = torch.randn(1, *random_model.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = random_model.timesteps(10)[:1]
    with torch.no_grad():
        same = torch.allclose(random_model.eps(x, t, shorter.embedding), random_model.eps(x, t, alone.embedding),
                              rtol=1e-4, atol=1e-5)
    assert same != padded


def test_empty_prompt_has_no_tokens_and_zero_gap(random_model):
    enc = random_model.encode([""])
    assert enc.prompt_mask.sum() == 0 and enc.embedding.shape[1] == 77
    assert first_step_scores(random_model, [""], [0])[0, 0] == pytest.approx(0.0, abs=1e-7)


def test_images_do_not_depend_on_batch_composition(random_model):
    imgs_a, gaps_a = generate(random_model, ["a red circle"], [4], steps=4)
    imgs_b, gaps_b = generate(random_model, ["a blue ring", "a red circle"], [4], steps=4)
    torch.testing.assert_close(torch.from_numpy(imgs_a[0]), torch.from_numpy(imgs_b[1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(gaps_a[0]), torch.from_numpy(gaps_b[1]), rtol=1e-4, atol=1e-6)


def test_monitoring_leaves_the_image_bit_identical(random_model):
    cond, uncond = random_model.encode(["a red circle", "a green cross"]), random_model.encode([""])
    x = initial_noise(random_model, random_model.latent_shape(), [1, 2])
    on = sample(random_model, cond, uncond, x, 5, monitor=True)
    off = sample(random_model, cond, uncond, x, 5, monitor=False)
    assert torch.equal(on.latents, off.latents) and off.trace is None and len(on.trace) == 5


def test_nan_predictions_give_unavailable_verdicts_not_crashes(random_model):
    from memoguard.verdict import verdict_for
    cond, uncond = random_model.encode(["a red circle", "a blue ring"]), random_model.encode([""])
    x = initial_noise(random_model, random_model.latent_shape(), [1, 2])
    x[1] = float("nan")
    result = sample(random_model, cond, uncond, x, 2)
    ok, bad = verdict_for(result.trace, images=2)
    assert ok.available and not bad.available and "not finite" in bad.reason


def test_missing_and_corrupt_weights_give_clear_errors(tmp_path, random_model_dir):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(random_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model(broken)
    missing = tmp_path / "missing"
    shutil.copytree(random_model_dir, missing)
    shutil.rmtree(missing / "text_encoder")
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model(missing)


def test_encode_rejects_a_bare_string(random_model):
    with pytest.raises(TypeError, match="list of prompt strings"):
        random_model.encode("a red circle")
