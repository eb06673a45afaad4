"""The evaluation models' ground truth: the second model's data is what issue 19 asks for, and both judges hold."""
import numpy as np
import pytest

from memoguard.tiny import outdoor
from memoguard.tiny.evalsets import eval_set


@pytest.fixture(scope="module")
def ds():
    return outdoor.build_dataset(0)


def _words(caption):
    return caption.replace(",", " ,").split()


def test_memorized_captions_are_ordinary_words_whose_combination_is_unique(ds):
    ordinary = [s.caption() for s in ds.ordinary_train_scenes]
    vocabulary = {w for c in ordinary for w in _words(c)}
    assert not set(ds.memorized_captions) & set(ordinary)  # only the combination is memorized
    for caption in ds.memorized_captions:
        assert set(_words(caption)) <= vocabulary, caption  # every word occurs in ordinary captions
    # articles and punctuation everywhere, not only in memorized captions
    assert sum("," in c for c in ordinary) > 500 and sum(c.startswith("a ") for c in ordinary) > 1000
    assert len(set(ds.memorized_captions)) == outdoor.N_MEMORIZED


def test_duplication_varies_and_labels_count_every_copy(ds):
    assert sorted(set(ds.memorized_duplicates)) == sorted(outdoor.DUPLICATES)
    assert int(ds.is_memorized.sum()) == sum(ds.memorized_duplicates)
    for caption, image, n in zip(ds.memorized_captions, ds.memorized_images, ds.memorized_duplicates):
        rows = [i for i, c in enumerate(ds.captions) if c == caption]
        assert len(rows) == n and all(np.array_equal(ds.images[i], image) for i in rows)


def test_images_have_natural_image_statistics(ds):
    """A 1/f amplitude spectrum: the power of the pink-noise texture falls with frequency."""
    noise = outdoor.pink_noise(np.random.default_rng(0), 0.05)
    power = np.abs(np.fft.fft2(noise[..., 0])) ** 2
    f = np.sqrt(np.fft.fftfreq(outdoor.SIZE)[:, None] ** 2 + np.fft.fftfreq(outdoor.SIZE)[None, :] ** 2)
    low, high = power[(f > 0) & (f < 0.15)].mean(), power[f > 0.35].mean()
    assert low > 10 * high
    assert ds.images.shape[1:] == (outdoor.SIZE, outdoor.SIZE, 3) and 0 <= ds.images.min() and ds.images.max() <= 1


def test_alignment_reads_what_a_caption_states(ds):
    scenes = ds.ordinary_train_scenes[:300]
    assert outdoor.alignment(ds.images[:300], scenes).mean() > 0.97
    # the same images judged against other captions' colours and settings score far lower
    shuffled = scenes[1:] + scenes[:1]
    assert outdoor.alignment(ds.images[:300], shuffled).mean() < 0.6


@pytest.mark.parametrize("name", ["shapes", "outdoor"])
def test_a_training_image_copies_itself(name):
    evalset = eval_set(name)
    assert evalset.is_copy(evalset.dataset.memorized_images).all()


def test_a_fresh_render_of_a_memorized_caption_is_not_a_copy(ds):
    """Textures, horizon and positions drawn anew: the outdoor judge needs the memorized image itself."""
    rng = np.random.default_rng(5)
    fresh = np.stack([outdoor.render(s, rng) for s in ds.memorized_scenes])
    assert not eval_set("outdoor").is_copy(fresh).any()


def test_table_scripts_take_each_models_own_labels(tmp_path):
    """benchmarks/*_table.py read the labels of the model they run on, and refuse another model's."""
    import json
    from pathlib import Path
    from memoguard.cli.bench import labelled_run
    root = Path(__file__).resolve().parents[1]
    labels = root / "benchmarks" / "bench_detection.json"
    out = tmp_path / "x.json"
    _, _, evalset, prompts, positive, first_step, found = labelled_run("t", ["--labels", str(labels), "--json", str(out)])
    assert evalset.name == "shapes" and len(prompts) == len(found["prompts"])
    assert int(positive.sum()) == sum(p["positive"] for p in json.loads(labels.read_text())["prompts"])
    assert first_step.shape == positive.shape
    with pytest.raises(SystemExit, match="measured on the 'outdoor' set"):
        labelled_run("t", ["--labels", str(root / "benchmarks" / "bench_detection_ldm.json"), "--json", str(out)])


def test_the_flow_model_is_a_standard_sd3_folder_sampled_as_its_pipeline_samples():
    """The flow evaluation model loads with diffusers' own API (no T5), MemoGuard encodes prompts as the pipeline
    does at the max_sequence_length its notes record, as it was trained (memoguard.tiny.train_flow), and samples
    what the pipeline samples from the same noise."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    from memoguard.resources import asset_path
    from memoguard.sampling import initial_noise, sample
    from memoguard.standalone.diffusers_model import load_model
    from memoguard.tiny.train import tokenize
    from memoguard.tiny.train_flow import encode_text
    folder = asset_path("tiny-flow")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    model = load_model(folder)
    assert (model.family, model.t5_length, model.training_notes["dataset"]) == ("sd3", 16, "outdoor")
    captions = [outdoor.build_dataset(0).memorized_captions[0], "a red ball in the snow", ""]
    enc = model.encode(captions)
    theirs, _, pooled, _ = pipe.encode_prompt(captions, captions, None, do_classifier_free_guidance=False,
                                              max_sequence_length=model.t5_length)
    same = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # the same encoder calls, however BLAS splits them
    assert same(enc.embedding, theirs) and same(enc.extra["pooled"], pooled)
    with torch.no_grad():
        trained = encode_text([pipe.text_encoder, pipe.text_encoder_2], tokenize(pipe.tokenizer, captions)[0])
    assert same(enc.embedding, trained[0]) and same(enc.extra["pooled"], trained[1])
    x = initial_noise(model, model.latent_shape(), [0])
    ours = sample(model, model.encode(captions[:1]), model.encode([""]), x, 10).latents
    size = model.image_size()[0]
    with torch.no_grad():
        pipeline = pipe(captions[0], negative_prompt="", num_inference_steps=10, guidance_scale=model.guidance,
                        height=size, width=size, latents=x, output_type="latent",
                        max_sequence_length=model.t5_length).images
    assert torch.allclose(ours, pipeline, rtol=1e-4, atol=1e-5)
