"""The DiffusionModel adapter over ComfyUI's model under ComfyUI's inference mode, and calibration choices."""
import json

import pytest
import torch

from memoguard import PromptEncoding, token_contributions
from memoguard.calibration import CalibrationError
from nodes.calibration_choice import file_options, lookup
from memoguard.host_autograd import differentiable
from nodes.comfy_model import CHUNK, ComfyDiffusionModel
from . import harness


def encoding(embedding, words):
    """A one-chunk prompt: BOS, `words` prompt tokens, then EOS/padding."""
    positions = torch.arange(embedding.shape[1])
    prompt = ((positions >= 1) & (positions <= words)).expand(embedding.shape[0], -1)
    return PromptEncoding(embedding, [[f"t{i}" for i in range(embedding.shape[1])]] * embedding.shape[0],
                          prompt, (positions % CHUNK == 0).expand(embedding.shape[0], -1))


@pytest.fixture(scope="module")
def inference_model():
    """Weights created the way ComfyUI runs nodes: as inference tensors."""
    with torch.inference_mode():
        unet, _ = harness.tiny_unet()
        base = harness.BaseModel(unet)
    assert next(base.parameters()).is_inference()
    return base


def test_token_contributions_need_and_get_the_gradient_route(inference_model):
    torch.manual_seed(3)
    sigmas = harness.schedule(inference_model, 5)
    with torch.inference_mode():
        cond, uncond, noise = torch.randn(1, 77, 64), torch.randn(1, 77, 64), torch.randn(1, 3, 16, 16)
        adapter = ComfyDiffusionModel(inference_model, sigmas)
        with pytest.raises(RuntimeError, match="does not require grad|[Ii]nference tensor"):
            token_contributions(adapter, encoding(cond, 4), encoding(uncond, 0), adapter.initial_x(noise),
                                total_steps=5, method="gradient_norm")
        with differentiable(inference_model):
            x_T = adapter.initial_x(noise.clone())
            result = token_contributions(adapter, encoding(cond.clone(), 4), encoding(uncond.clone(), 0), x_T,
                                         steps=2, total_steps=5, method="gradient_norm")[0]
    assert result.tokens == ["t1", "t2", "t3", "t4"]
    assert all(s > 0 for s in result.scores) and sum(result.shares) == pytest.approx(1.0)


def test_adapter_matches_comfy_conventions(inference_model):
    sigmas = harness.schedule(inference_model, 4)
    adapter = ComfyDiffusionModel(inference_model, sigmas)
    alpha, sigma = adapter.coefficients(sigmas[:2])
    assert torch.equal(alpha, torch.ones(2)) and torch.equal(sigma, sigmas[:2])
    with pytest.raises(ValueError, match="4-step schedule, not 6"):
        adapter.timesteps(6)


def test_calibration_choices_never_raise(tmp_path):
    key = "unet-0123456789abcdef"
    assert lookup("none", folders=[tmp_path]).resolve(key).problem == "calibration 'none' chosen: raw score only"
    (tmp_path / "bad.json").write_text("{")
    assert "unreadable" in lookup("file", "bad.json", folders=[tmp_path]).resolve(key).problem
    assert "no file picked" in lookup("file", "(none)", folders=[tmp_path]).resolve(key).problem
    assert "no file picked" in lookup("file", "  ", folders=[tmp_path]).resolve(key).problem  # a saved workflow's ""
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": 1, "models": {key: {"scores": [0.01 * i for i in range(1, 101)]}}}))
    found = lookup("file", "good.json", folders=[tmp_path]).resolve(key)
    assert found.calibration.model_key == key and str(good) in found.message
    found = lookup("file", "good.json", folders=[tmp_path]).resolve("unet-ffffffffffffffff")
    assert found.calibration is None and "another model" in found.problem and "MemoGuard Calibrate" in found.problem
    found = lookup("auto", folders=[tmp_path]).resolve("unet-ffffffffffffffff")
    assert found.calibration is None and "no calibration for this model" in found.problem
    assert "MemoGuard Calibrate" in found.problem
    with pytest.raises(CalibrationError, match="calibration must be one of"):
        lookup("bundled tiny model")


def test_calibration_files_are_picked_from_the_folder_never_by_path(tmp_path):
    """A path (a saved workflow's free text, or a crafted prompt) is refused with the same words whether or not
    the file exists: no file outside models/memoguard is read, and no answer says what exists elsewhere."""
    folder, elsewhere = tmp_path / "memoguard", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    key = "unet-0123456789abcdef"
    body = json.dumps({"format": 2, "models": {key: {"scores": [0.01 * i for i in range(1, 101)]}}})
    (folder / "mine.json").write_text(body)
    (elsewhere / "valid.json").write_text(body)
    (folder / "notes.txt").write_text("not a calibration")
    assert file_options()[0] == "(none)"
    problems = set()
    for name in (str(elsewhere / "valid.json"), str(elsewhere / "missing.json"), "/etc/passwd", "../elsewhere/valid.json",
                 "valid.json", "..", "notes.txt"):
        found = lookup("file", name, folders=[folder]).resolve(key)
        assert found.calibration is None and f"is not one of the calibrations in {folder}" in found.problem
        problems.add(found.problem.replace(repr(name), "NAME"))
    assert len(problems) == 1  # the same answer for a file that exists and one that does not
    assert lookup("file", "mine.json", folders=[folder]).resolve(key).calibration.model_key == key


def test_pack_modules_import_without_diffusers_or_transformers():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; import nodes.monitor_hook, nodes.mitigation_hook, nodes.comfy_model, nodes.tiny_loader, "
            "nodes.plots, nodes.calibration_choice, nodes.live, nodes.calibration_run, nodes.latents; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tiny_loader_reads_folders_only_from_models_memoguard(tmp_path, monkeypatch):
    """The loader's folder is picked from the list (the bundled model, or diffusers folders in models/memoguard);
    a saved workflow's free-text path still queues (validate_inputs) and then gets the same words whether or not
    it exists."""
    import importlib
    from nodes.tiny_loader import TinyModelError
    from . import harness
    with harness.comfy_api_stand_in():
        loader = importlib.import_module("nodes.nodes_loader")
    BUNDLED, MemoGuardTinyModelLoader, model_folders = loader.BUNDLED, loader.MemoGuardTinyModelLoader, loader.model_folders
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path / "memoguard"))
    mine = tmp_path / "memoguard" / "my-tiny"
    mine.mkdir(parents=True)
    (mine / "model_index.json").write_text("{}")
    (tmp_path / "memoguard" / "not-a-model").mkdir()
    assert list(model_folders()) == ["my-tiny"] and model_folders()["my-tiny"] == mine
    assert MemoGuardTinyModelLoader.validate_inputs("/some/old/path") is True
    messages = set()
    for given in (str(mine), "/etc", str(tmp_path / "missing"), "not-a-model", "../memoguard/my-tiny"):
        with pytest.raises(TinyModelError, match="is not one of the tiny models in models/memoguard") as e:
            MemoGuardTinyModelLoader.execute(given)
        messages.add(str(e.value).replace(repr(given), "X"))
    assert len(messages) == 1
    assert BUNDLED == "(bundled)"


@pytest.fixture(scope="module")
def with_clip():
    with torch.inference_mode():
        unet, text_encoder = harness.tiny_unet()
        base = harness.BaseModel(unet)
    base.latent_format = harness.ChromaRadiance()  # 3 channels at image size, as the tiny UNet samples
    return base, harness.CLIP(text_encoder)


def test_words_are_bpe_pieces_together_and_a_word_left_out_is_the_prompt_without_it(with_clip):
    """encode_without re-tokenizes the text through the CLIP and drops the word's tokens: the same conditioning as
    the prompt typed without the word."""
    base, clip = with_clip
    sigmas = harness.schedule(base, 4)
    text = "a purple ring, lighthouse poster"
    with torch.inference_mode():
        adapter = ComfyDiffusionModel(base, sigmas, clip, torch.randn(1, 3, 16, 16))
        cond = adapter.encode([text])
        words = ["".join(cond.tokens[0][i] for i in g) for g in cond.word_groups(0)]
        assert words == ["a", "purple", "ring", ",", "lighthouse", "poster"] and adapter.can_reencode(cond)
        assert cond.texts == [text] and cond.ids.shape == (1, 77)
        ring, lighthouse = cond.word_groups(0)[2], cond.word_groups(0)[4]
        edited = adapter.encode_without(cond, [(0, lighthouse), (0, ring + lighthouse)])
        typed = adapter.encode(["a purple ring, poster", "a purple , poster"])
    assert torch.allclose(edited.embedding, typed.embedding, atol=1e-6) and edited.padded is None
    # an encoding a host handed over (no text) is not re-encoded: the explanation falls back to gradient x input
    assert not adapter.can_reencode(encoding(cond.embedding, 7))


def test_a_word_left_out_of_a_long_prompt_is_the_prompt_typed_without_it(with_clip):
    """ComfyUI chunks a prompt typed without a word afresh (the words after it move up a chunk): encode_without is
    that prompt, brought back to the length the sampler has by repeating it whole where a chunk was lost (as
    ComfyUI's CFG batches prompts of different lengths), else padded with the empty prompt's chunk and marked."""
    base, clip = with_clip
    head = "a purple ring, lighthouse poster"
    with torch.inference_mode():
        adapter = ComfyDiffusionModel(base, harness.schedule(base, 4), clip, torch.randn(1, 3, 16, 16))
        # 6 words + 74 fillers = 80 tokens: two chunks before and after; "lighthouse" (word 4) lies in the first
        text = head + " red" * 74
        cond = adapter.encode([text])
        assert cond.embedding.shape[1] == 2 * CHUNK
        edited = adapter.encode_without(cond, [(0, cond.word_groups(0)[4])])
        typed = adapter.encode([head.replace(" lighthouse", "") + " red" * 74])
        # one token fewer than two chunks' 151 (ids 0..150: BOS, 75, EOS, BOS, 75 ...): typed alone it is one chunk
        short = adapter.encode([head + " red" * 70])
        assert short.embedding.shape[1] == 2 * CHUNK
        lost = adapter.encode_without(short, [(0, short.word_groups(0)[4])])
        alone = adapter.encode([head.replace(" lighthouse", "") + " red" * 70])
        # three chunks that lose one: two do not divide three, so the shorter prompt is padded, and marked
        three = adapter.encode([head + " red" * 145])
        padded = adapter.encode_without(three, [(0, three.word_groups(0)[4])])
        # a word the text does not spell as its pieces do (CLIP's byte-level pieces of "é"): left out in place
        accented = adapter.encode(["a purple café, lighthouse poster" + " red" * 74])
        cafe = next(g for g in accented.word_groups(0) if "".join(accented.tokens[0][i] for i in g) != "".join(
            accented.tokens[0][i] for i in g).encode("ascii", "ignore").decode())
        kept_chunks = adapter.encode_without(accented, [(0, cafe)])
    assert torch.allclose(edited.embedding, typed.embedding, atol=1e-6) and edited.padded is None
    assert alone.embedding.shape[1] == CHUNK and lost.padded is None
    assert torch.allclose(lost.embedding, alone.embedding.repeat(1, 2, 1), atol=1e-6)
    assert padded.embedding.shape[1] == 3 * CHUNK and padded.padded == [True]
    assert torch.allclose(padded.embedding[:, 2 * CHUNK:], adapter.encode([""]).embedding, atol=1e-6)
    assert kept_chunks.embedding.shape[1] == 2 * CHUNK and kept_chunks.padded == [True]


def test_token_contributions_node_leaves_each_word_out_and_says_when_none_ends_the_recall(with_clip, tmp_path):
    import importlib
    from memoguard.calibration import Calibration
    from nodes.calibration_choice import model_key
    base, clip = with_clip
    with harness.comfy_api_stand_in():
        node = importlib.import_module("nodes.nodes_tokens").TokenContributionsNode
        node.hidden = type("Hidden", (), {"unique_id": "10"})
        patcher = harness.ModelPatcher(base)
        latent = {"samples": torch.zeros(1, 3, 16, 16)}
        run = lambda **kw: json.loads(node.execute(patcher, clip, "a purple ring, lighthouse poster", latent, 0, 4,
                                                   1, 7.5, "normal", 1, **kw).args[1])
        plain = run(calibration="none")
        assert plain["method"] == "leave_one_out" and plain["tokens"][4] == "lighthouse"
        assert plain["threshold"] is None and plain["summary"].startswith("top words (leave-one-out): ")
        without = plain["score_without"]
        assert all(w is not None for w in without)
        # a calibration whose 1% threshold lies under every score without a word: no single word ends the recall
        low = min(without) / 2
        Calibration(model_key(base), [low * (1 + i / 1000) for i in range(100)]).save(tmp_path / "c.json")
        from nodes import calibration_choice
        folders = calibration_choice.calibration_folders
        calibration_choice.calibration_folders = lambda: [tmp_path]
        try:
            spread = run(calibration="file", calibration_file="c.json")
        finally:
            calibration_choice.calibration_folders = folders
    assert spread["threshold"] < min(without)
    assert spread["summary"].startswith("spread over the caption: no single word ends the recall")
