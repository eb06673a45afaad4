"""The standalone path on today's flow-matching pipelines (SD3, Flux schnell, Flux dev, Chroma, Qwen-Image): tiny random-weight pipeline
folders built by tests/flow_pipelines.py from diffusers' and transformers' own classes, loaded like downloaded ones."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from flow_pipelines import build_flow_pipeline  # noqa: E402

from memoguard.cli import main as cli  # noqa: E402
from memoguard.cli.lib.inputs import load_calibration  # noqa: E402
from memoguard.explain import token_contributions  # noqa: E402
from memoguard.mitigate import MitigationError, mitigate  # noqa: E402
from memoguard.sampling import initial_noise, sample  # noqa: E402
from memoguard.score import step_score  # noqa: E402
from memoguard.standalone.diffusers_model import load_model  # noqa: E402

pytest.importorskip("diffusers")
PROMPT = "a red cat, on a mat"
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {family: build_flow_pipeline(root / family, family, seed=k)
            for k, family in enumerate(("sd3", "flux", "flux-dev", "chroma", "qwen-image"))}


@pytest.fixture(scope="module")
def models(folders):
    out = {family: load_model(folder) for family, folder in folders.items()}
    out["chroma"].sample_size = 32  # 256 image tokens, not the pipeline's default 4,096: the test's time
    out["qwen-image"].sample_size = 16
    return out


def _pipeline_latents(folder, model, x):
    """What diffusers' own pipeline samples from x (B, C, H, W), as unpacked latents."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    size = model.image_size()[0]
    if model.family == "sd3":
        return pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=model.guidance, height=size,
                    width=size, latents=x, output_type="latent").images
    b, c, h, w = x.shape
    packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    extra = ({"negative_prompt": "", "guidance_scale": model.guidance} if model.family == "chroma"
             else {"negative_prompt": "", "true_cfg_scale": model.guidance} if model.family == "qwen-image"
             else {} if model.embedded_guidance is None else {"guidance_scale": model.embedded_guidance})
    out = pipe(PROMPT, num_inference_steps=STEPS, height=size, width=size, latents=packed, output_type="latent",
               **extra).images
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-dev", "chroma", "qwen-image"])
def test_monitored_sampling_is_the_pipelines_own_and_the_monitor_changes_no_bit(folders, models, family):
    model = models[family]
    cond, uncond = model.encode([PROMPT]), model.encode([""])
    x = initial_noise(model, model.latent_shape(), [0])
    monitored = sample(model, cond, uncond, x, STEPS)
    plain = sample(model, cond, uncond, x, STEPS, monitor=False)
    assert torch.equal(monitored.latents, plain.latents)
    theirs = _pipeline_latents(folders[family], model, x)
    assert torch.allclose(monitored.latents, theirs, rtol=1e-4, atol=1e-5)
    # a flow sampler starts at sigma 1, where the velocity difference (the score) is not zero
    assert model.noise_level(model.timesteps(STEPS)[0]) == pytest.approx(1.0)
    assert float(monitored.trace.score()[0]) > 0


def test_a_guidance_distilled_model_pays_one_unconditional_pass_for_its_score(models):
    model = models["flux-dev"]
    assert model.guidance == 1.0 and model.embedded_guidance == 3.5
    assert models["flux"].embedded_guidance is None and models["sd3"].guidance > 1
    calls = []
    inner = model.raw_prediction
    model.raw_prediction = lambda x, *a: calls.append(x.shape[0]) or inner(x, *a)
    try:
        x = initial_noise(model, model.latent_shape(), [0, 1])
        run = sample(model, model.encode([PROMPT]).repeat_rows(2), model.encode([""]), x, STEPS)
    finally:
        del model.raw_prediction
    assert calls == [2, 2] + [2] * (STEPS - 1)  # the prompt's pass each step, the empty prompt's at the first only
    assert run.trace.step_indices() == [0]


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
def test_leaving_a_word_out_is_the_prompt_typed_without_it_in_every_stream(models, family):
    model = models[family]
    enc = model.encode([PROMPT])
    words = ["".join(enc.tokens[0][i] for i in group) for group in enc.word_groups(0)]
    assert words == ["a", "red", "cat", ",", "on", "a", "mat"]  # a word's text once, whatever its streams
    if family == "sd3":  # each word has its CLIP positions and its T5 positions
        assert all(min(g) < 77 <= max(g) for g in enc.word_groups(0))
    without = model.encode_without(enc, [(0, enc.word_groups(0)[1]), (0, enc.word_groups(0)[6])])
    typed = model.encode(["a cat, on a mat", "a red cat, on a"])
    assert torch.allclose(without.embedding, typed.embedding, atol=1e-6)
    for key in typed.extra:  # the pooled CLIP too; Chroma's mask: the shorter prompt is shorter
        assert torch.equal(without.extra[key], typed.extra[key]) or torch.allclose(without.extra[key],
                                                                                     typed.extra[key], atol=1e-6)
    if family == "chroma":
        assert (without.extra["attention_mask"].sum(1) < enc.extra["attention_mask"].sum()).all()
    assert not torch.allclose(without.embedding[0], enc.embedding[0], atol=1e-4)


def test_qwen_image_leaves_a_word_out_as_the_prompt_typed_without_it(models):
    """Qwen-Image: the words are the prompt's, not the chat template's; a prompt without a word is encoded at its own
    length and padded under the mask to the batch's, which predicts what the shorter prompt alone predicts."""
    model = models["qwen-image"]
    enc = model.encode([PROMPT])
    assert ["".join(enc.tokens[0][i] for i in g) for g in enc.word_groups(0)] == ["a", "red", "cat", ",", "on", "a",
                                                                                   "mat"]
    assert bool(enc.frozen_mask.any()) and not bool((enc.frozen_mask & enc.prompt_mask).any())  # the template
    groups = enc.word_groups(0)
    without = model.encode_without(enc, [(0, groups[1]), (0, groups[3]), (0, groups[0])])
    typed = ["a cat, on a mat", "a red cat on a mat", "red cat, on a mat"]
    assert without.embedding.shape[1] == enc.embedding.shape[1]
    x = initial_noise(model, model.latent_shape(), [0])
    t = model.timesteps(STEPS)[0]
    padded = model.eps(x.repeat(3, 1, 1, 1), t, without.embedding, without.extra)
    for k, text in enumerate(typed):
        alone = model.encode([text])
        assert int(without.extra["mask"][k].sum()) == alone.embedding.shape[1]
        assert torch.allclose(padded[k], model.eps(x, t, alone.embedding, alone.extra)[0], atol=1e-5)
    # the empty prompt is shorter and is evaluated at its own length, never repeated to the prompt's
    uncond = model.encode([""])
    assert uncond.embedding.shape[1] < enc.embedding.shape[1]
    eps_c, eps_u = model.eps_pair(x, t, enc, uncond)
    assert torch.equal(eps_u, model.eps(x, t, uncond.embedding, uncond.extra))


def test_qwen_image_without_a_fast_tokenizer_is_refused_with_the_reason():
    from types import SimpleNamespace
    from memoguard.errors import ModelLoadError
    from memoguard.standalone.diffusers_qwen import QwenImageModel
    with pytest.raises(ModelLoadError, match="fast tokenizer"):
        QwenImageModel(SimpleNamespace(tokenizer=SimpleNamespace(is_fast=False)), name="slow")


def test_words_past_clips_75_tokens_are_explained_in_t5_alone(models):
    model = models["sd3"]
    prompt = " ".join(["red cat"] * 40)  # 80 words: CLIP keeps 75 of them, T5 all
    enc = model.encode([prompt])
    groups = enc.word_groups(0)
    assert len(groups) == 80
    assert all(min(g) >= 77 for g in groups[75:]) and all(min(g) < 77 for g in groups[:75])
    assert ["".join(enc.tokens[0][i] for i in g) for g in groups[74:77]] == ["red", "cat", "red"]


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "chroma", "qwen-image"])
def test_leave_one_out_explains_the_words_of_a_flow_prompt(models, family):
    model = models[family]
    cond, uncond = model.encode([PROMPT]), model.encode([""])
    x = initial_noise(model, model.latent_shape(), [0])
    result = token_contributions(model, cond, uncond, x, total_steps=STEPS)[0]
    assert result.method == "leave_one_out"
    assert result.tokens == ["a", "red", "cat", ",", "on", "a", "mat"]
    assert any(abs(v) > 0 for v in result.scores)


def test_flow_models_mitigate_by_removing_words_and_mask_only_clips_padding(models):
    model, prompt = models["sd3"], "red cat on old mat"
    cond, uncond = model.encode([prompt]), model.encode([""])
    x = initial_noise(model, model.latent_shape(), [0])
    t = model.timesteps(STEPS)
    plan = mitigate(model, cond, uncond, x, t, model.guidance, strategy="remove_tokens", target=0.0, max_removals=2)
    assert len(plan.record.removed[0]) == 2
    # the prompt sampled is the one typed without the removed words, and the record's score is that prompt's
    typed = model.encode([" ".join(w for w in prompt.split() if w not in plan.record.removed[0])])
    assert torch.allclose(plan.cond.embedding, typed.embedding, atol=1e-6)
    eps_u = model.eps(x, t[0], uncond.embedding, uncond.extra)
    after = step_score(model.eps(x, t[0], typed.embedding, typed.extra) - eps_u)
    assert float(after[0]) == pytest.approx(plan.record.after[0], rel=1e-4)
    # SD3's default: its CLIP chunk's padding zeroed (after the end-of-text), T5's positions untouched
    plan = mitigate(model, cond, uncond, x, t, model.guidance, strategy="auto", target=0.0)
    zeroed = (plan.cond.embedding[0] != cond.embedding[0]).any(-1).nonzero().flatten().tolist()
    words = len(prompt.split())
    assert plan.record.strategy == "mask_padding" and zeroed == list(range(words + 2, 77))
    assert plan.record.masked == [77 - words - 2] and not plan.cond.embedding[0, zeroed].any()
    chroma = models["chroma"]
    with pytest.raises(MitigationError, match="CLIP's padding"):
        mitigate(chroma, chroma.encode([prompt]), chroma.encode([""]), initial_noise(chroma, chroma.latent_shape(),
                 [0]), chroma.timesteps(STEPS), chroma.guidance, strategy="mask_padding", target=0.0)


def test_cli_calibrates_scans_and_generates_a_flow_model_under_its_own_key(folders, models, tmp_path, capsys):
    prompts = tmp_path / "benign.txt"
    prompts.write_text("\n".join(f"a {c} {a} by the {p}" for c in ("red", "blue", "old") for a in ("cat", "dog")
                                 for p in ("river", "tree", "house")))
    cal = tmp_path / "flux-dev.json"
    assert cli(["calibrate", "--model", str(folders["flux-dev"]), "--prompts", str(prompts), "--seeds", "2",
                "--steps", str(STEPS), "--band-prompts", "2", "--band-steps", "3", "--out", str(cal)]) == 0
    assert "calibrate it there" in capsys.readouterr().out
    entry = json.loads(cal.read_text())["models"][models["flux-dev"].model_key]
    assert entry["conditions"]["prediction"] == "flow" and entry["conditions"]["noise_level"] == pytest.approx(1.0)
    assert entry["conditions"]["embedded_guidance"] == 3.5 and len(entry["band"]["median"]) == 3
    # never applied to another model: Flux schnell has its own key
    with pytest.raises(Exception, match="key|calibrat"):
        load_calibration(cal, models["flux"], STEPS)
    model = models["flux-dev"]
    model.embedded_guidance = 2.0
    try:
        _, notes = load_calibration(cal, model, STEPS)
    finally:
        model.embedded_guidance = 3.5
    assert any("embedded guidance 3.5" in n for n in notes)
    out = tmp_path / "out"
    assert cli(["generate", "--model", str(folders["flux-dev"]), "--prompt", PROMPT, "--seeds", "0,1", "--steps",
                str(STEPS), "--calibration", str(cal), "--mitigation", "default", "--mode", "always", "--target", "0",
                "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [len(r["scores"]) for r in records] == [1, 1]  # cfg 1: the first step scored, no other
    assert all(r["verdict"]["threshold"] == pytest.approx(max(entry["scores"]), rel=0.05) for r in records)
    assert all(r["mitigation"]["strategy"] == "remove_tokens" for r in records)
    assert cli(["scan", "--model", str(folders["flux-dev"]), "--prompt", PROMPT, "--steps", str(STEPS),
                "--calibration", str(cal), "--explain", "7"]) == 0
    line = capsys.readouterr().out
    assert all(word in line for word in ("red", "cat", "mat"))
