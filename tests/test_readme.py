"""README.md as a user meets it: every Python block runs as written, in order, in one session (as a reader pastes
them), on the bundled model; the command synopsis names real commands and options; CI runs the test command word
for word. Blocks that are fragments of a user's own loop (the training filter, a custom sampler) run after a
setup that plays that loop on the bundled model: the names the README says come from the user's code."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from memoguard.standalone.diffusers_model import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(language):
    return [(README[:m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(README) if m.group(1) == language]


def test_every_block_says_its_language():
    assert not blocks(""), "untagged code blocks: tag them (python, bash, text)"


def test_ci_runs_the_readme_test_command_word_for_word():
    commands = [code.strip() for _, code in blocks("bash")]
    assert len(commands) == 2 and commands[1].endswith("-m pytest -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
    install = commands[1].split(" && ")[0:2]
    assert commands[0].startswith(" && ".join(install).replace(" -q", "").replace(",test]", "]"))


def test_the_command_synopsis_parses():
    from memoguard.cli import build_parser
    synopses = [code for _, code in blocks("text") if "python -m memoguard" in code]
    assert synopses
    parser = build_parser()
    for line in [line for code in synopses for line in code.splitlines()]:
        line = re.sub(r"\[[^\]]*\]", "", line.split("#")[0])  # optional parts and comments
        words = [{"...": "a red circle", "DIR": "out", "PATH": "model"}.get(w, w) for w in shlex.split(line)]
        assert words[:3] == ["python", "-m", "memoguard"], line
        parser.parse_args(words[3:])  # SystemExit on an unknown command or option


def _training_loop(ns):
    """One step of a user's fine-tuning loop on the bundled model (train_text_to_image.py's names)."""
    import copy
    import accelerate
    pipe = ns["pipe"]
    captions = ["a purple ring, lighthouse poster", "a red circle", "a small blue ring", "a green square"]

    def encode(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0].detach()

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 3, 16, 16, generator=g)
    noise = torch.randn(4, 3, 16, 16, generator=g)
    timesteps = torch.randint(0, 1000, (4,), generator=g)
    unet = copy.deepcopy(pipe.unet)
    optimizer = torch.optim.AdamW(unet.parameters(), 1e-4)
    ns.update(unet=unet, captions=captions, latents=latents, noise=noise, target=noise, timesteps=timesteps,
              noisy_latents=pipe.scheduler.add_noise(latents, noise, timesteps), encoder_hidden_states=encode(captions),
              cond=encode(captions), empty=encode([""]), noise_scheduler=pipe.scheduler, v_pred=False,
              F=torch.nn.functional, optimizer=optimizer, accelerator=accelerate.Accelerator(cpu=True),
              lr_scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0), global_step=0,
              caption_dropout=[False, False, True, False])


def _ordinary_gaps(ns):
    """A few hundred ordinary samples' gaps and timesteps, no grad (what the README asks the user to measure)."""
    from memoguard import gaps_from_predictions
    pipe = ns["pipe"]
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (256,), generator=g)
    x = pipe.scheduler.add_noise(torch.randn(256, 3, 16, 16, generator=g), torch.randn(256, 3, 16, 16, generator=g), t)
    ids = pipe.tokenizer(["a red circle"] * 256, padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = pipe.tokenizer([""] * 256, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond, uncond = pipe.text_encoder(ids)[0], pipe.text_encoder(empty)[0]
        ns.update(ordinary_gaps=gaps_from_predictions(pipe.unet(x, t, cond).sample, pipe.unet(x, t, uncond).sample),
                  ordinary_t=t)


def _this_batch(ns):
    from memoguard import gaps_from_predictions
    ns["gaps"] = gaps_from_predictions(ns["model_pred"], ns["pred_u"])


def _sampler_step(ns, tmp_path):
    from memoguard import Calibration
    g = torch.Generator().manual_seed(2)
    ns.update(step=0, pred_cond=torch.randn(2, 4, 8, 8, generator=g), pred_uncond=torch.randn(2, 4, 8, 8, generator=g))
    Calibration("my-model", [0.01 * i for i in range(1, 101)]).save(tmp_path / "cal.json")


def _single_file(tmp_path):
    from safetensors.torch import save_file
    from test_checkpoints import tiny_ldm_state
    save_file(tiny_ldm_state(), str(tmp_path / "tiny.safetensors"))


def _modular_pipeline(ns):
    """The user's modular pipeline: SDXL's blocks on tiny random parts (no VAE, so no decode step)."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from test_diffusers_hook import tiny_sdxl_pipeline
    parts = tiny_sdxl_pipeline()
    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks.pop("decode")
    pipe = blocks.init_pipeline()
    pipe.update_components(unet=parts.unet, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                           tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, scheduler=parts.scheduler)
    ns["modular_pipe"] = pipe


# the README block (by a line it holds) -> what runs before it
SETUPS = {
    'load_model("tiny.safetensors"': lambda ns, tmp: _single_file(tmp),
    "filt = MemorizationFilter(percentile=95": lambda ns, tmp: _training_loop(ns),
    "relative_to_ordinary(ordinary_gaps, ordinary_t, 0.05)   #": lambda ns, tmp: _ordinary_gaps(ns),
    "bar_alpha=1e-4": lambda ns, tmp: _this_batch(ns),
    "trace = ScoreTrace()": lambda ns, tmp: _sampler_step(ns, tmp),
    "MemoGuardGuidance(": lambda ns, tmp: _modular_pipeline(ns),
}


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    """In README order and one namespace, from a folder where `memoguard/assets/...` resolves as in a checkout."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    (tmp_path / "memoguard").symlink_to(ROOT / "memoguard", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path / "calibrations"))
    namespace = {}
    ran = []
    for line, code in blocks("python"):
        for marker, setup in SETUPS.items():
            if marker in code:
                setup(namespace, tmp_path)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
        ran.append(line)
    assert len(ran) == len(blocks("python")) >= 8
    printed = capsys.readouterr().out
    assert "LIKELY MEMORIZED" in printed  # the watched memorized caption, judged by the bundled calibration
    assert namespace["record"].strategy == "mask_padding" and namespace["keep"].dtype == torch.bool
    assert len(namespace["guider"].recorder.verdicts()) == 1 and not namespace["guider"].record.ran  # no calibration
    assert BUNDLED_MODEL.is_dir() and json.loads((tmp_path / "cal.json").read_text())["models"]["my-model"]
