"""The fine-tuner's audit (`memoguard audit`): a dataset's captions ranked by recall on the model, with and without a
LoRA, the top ones sampled and judged against their own images; resumable."""
import json

import pytest
import torch

from memoguard.cli import main as cli
from memoguard.standalone.diffusers_model import BUNDLED_MODEL, load_model
from memoguard.tiny.evalsets import eval_set

FAST = ["--steps", "10", "--seeds", "2", "--top", "2", "--images", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit") / "shapes"
    eval_set("shapes").write_training_folder(folder)
    return folder


def test_the_audit_ranks_the_duplicated_captions_first_and_finds_their_images(dataset, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert cli(["audit", "--dataset", str(dataset), "--cache", str(tmp_path / "cache"), "--out", str(out), *FAST]) == 0
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    memorized = set(eval_set("shapes").dataset.memorized_captions)
    ranked = sorted(records, key=lambda r: -r["score"])
    top = [r["caption"] for r in ranked[:len(memorized)]]
    assert sum(c in memorized for c in top) >= 0.8 * len(memorized)  # the duplicated pairs lead the ranking
    assert all(r["base_score"] is None and r["added"] is None for r in records)
    text = out.read_text()
    assert text.count('alt="generation and nearest training image"') == 4 and "Every caption by recall" in text
    printed = capsys.readouterr().out
    assert "generations nearest to their own image" in printed
    # --resume keeps what was scored: nothing is scored again, the same report comes out
    assert cli(["audit", "--dataset", str(dataset), "--cache", str(tmp_path / "cache"), "--out", str(out), *FAST]) == 2
    assert cli(["audit", "--dataset", str(dataset), "--cache", str(tmp_path / "cache"), "--out", str(out), "--resume",
                *FAST]) == 0
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == len(records)


@pytest.fixture(scope="module")
def lora_state():
    """A LoRA of the bundled UNet's attention projections as peft holds it (rank 4, alpha 4), B weights moved too."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = load_model(BUNDLED_MODEL)
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():  # a trained LoRA moves the model: give B weights too (peft starts them at zero)
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return get_peft_model_state_dict(model.unet)


@pytest.fixture(scope="module")
def small(dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")  # a few captions are enough here
    for f in sorted(dataset.iterdir())[:20]:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _audit(small, tmp_path, name, *extra):
    out = tmp_path / f"{name}.html"
    assert cli(["audit", "--dataset", str(small), "--cache", str(tmp_path / "cache"), "--out", str(out), *extra,
                *FAST]) == 0
    return out, [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


def test_a_lora_is_scored_with_and_without_and_off_is_the_model_alone(lora_state, small, tmp_path):
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=lora_state)
    (lora,) = (tmp_path / "lora").glob("*.safetensors")
    out, records = _audit(small, tmp_path, "lora", "--lora", str(lora))
    alone = {r["caption"]: r["score"] for r in _audit(small, tmp_path, "plain")[1]}
    assert all(r["base_score"] == pytest.approx(alone[r["caption"]], rel=1e-5, abs=1e-7) for r in records)
    assert any(abs(r["added"]) > 1e-4 for r in records)
    assert "LoRA " + lora.name in out.read_text()


def test_a_kohya_layout_lora_scores_as_the_same_lora_in_diffusers_layout(lora_state, small, tmp_path):
    """kohya-ss/sd-scripts' file layout (lora_unet_<module path with underscores>.lora_down / lora_up / alpha), the
    one most LoRAs hobbyists share are in, is read as the same LoRA."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    StableDiffusionPipeline.save_lora_weights(tmp_path / "diffusers", unet_lora_layers=lora_state)
    (diffusers_file,) = (tmp_path / "diffusers").glob("*.safetensors")
    kohya = {}
    for key, value in lora_state.items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    kohya_file = tmp_path / "kohya_style.safetensors"
    save_file(kohya, str(kohya_file))
    theirs = {r["caption"]: r for r in _audit(small, tmp_path, "diffusers", "--lora", str(diffusers_file))[1]}
    out, records = _audit(small, tmp_path, "kohya", "--lora", str(kohya_file))
    assert records and any(abs(r["added"]) > 1e-4 for r in records)
    for r in records:
        assert r["score"] == pytest.approx(theirs[r["caption"]]["score"], rel=1e-4, abs=1e-7)
        assert r["added"] == pytest.approx(theirs[r["caption"]]["added"], rel=1e-3, abs=1e-6)
    assert "LoRA kohya_style.safetensors" in out.read_text()
