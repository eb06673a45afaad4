"""The extension inside a real Forge Neo on a flow-matching DiT that samples with CFG (and at CFG scale 1): Anima (Cosmos-Predict2 DiT,
Qwen3-0.6B text encoder through its LLM adapter, Qwen-Image VAE, 16-channel video latents), random weights built
from Neo's own classes by tests/hosts/make_random_anima.py. Neo detects Anima only at full size (2B parameters):
64x64 images of 3 steps, about 8 s each on 2 CPU cores, 10-14 GiB of RAM.

Run by tests/hosts/run_forge_neo_real.sh (FORGE_KIND=forge-neo) after the SD1.5 suite; skipped elsewhere, and where
the Anima files are missing (ANIMA_DIR, default HOSTS/models/anima).
"""
import json
import os
from pathlib import Path

import pytest

from real_checks import ROUTE, SMALL_CALIBRATION, first, generate_in_a_browser
from real_host import call, errors_logged, launch_flags, pixels, running_webui, txt2img

FORGE_DIR = os.environ.get("FORGE_DIR")
ANIMA_DIR = Path(os.environ.get("ANIMA_DIR", f"{os.environ.get('HOSTS', '/work/hosts')}/models/anima"))
CHECKPOINT, TEXT_ENCODER, VAE = ("random-anima.safetensors", "random-anima-qwen3-06b.safetensors",
                                 "random-anima-qwen-image-vae.safetensors")
pytestmark = pytest.mark.skipif(not FORGE_DIR or os.environ.get("FORGE_KIND") != "forge-neo",
                                reason="Forge Neo only (tests/hosts/run_forge_neo_real.sh)")
SIZE = dict(width=64, height=64, steps=3, cfg_scale=4)
MONITOR = [1, 0, "", 0.01, False, 1, "off", 0, 0.05, 10]
# the arguments past the tenth: strategy, delay, explanation method, early scale
MITIGATE = [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10]
EXPLAIN = [1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10]
NOT_EXPLAINED = "tokens not explained: on a rectified-flow model"


@pytest.fixture(scope="module")
def anima(tmp_path_factory):
    missing = [name for name in (CHECKPOINT, TEXT_ENCODER, VAE) if not (ANIMA_DIR / name).is_file()]
    if missing:
        pytest.skip(f"no random Anima in {ANIMA_DIR} ({', '.join(missing)}): run tests/hosts/make_random_anima.py")
    root = Path(FORGE_DIR)
    python = os.environ.get("FORGE_PYTHON", str(root / "venv" / "bin" / "python"))
    data = tmp_path_factory.mktemp("neo-anima")
    folders = {}
    for kind, name in (("checkpoints", CHECKPOINT), ("text_encoders", TEXT_ENCODER), ("vaes", VAE)):
        folders[kind] = data / kind
        folders[kind].mkdir()
        (folders[kind] / name).symlink_to(ANIMA_DIR / name)
    flags = [*launch_flags("forge-neo", folders["checkpoints"] / CHECKPOINT),
             "--text-encoder-dirs", str(folders["text_encoders"]), "--vae-dirs", str(folders["vaes"])]
    webui = data / "webui"
    webui.mkdir()
    # the page and the API of one server: a second Neo with this 2B model would not fit beside it
    with running_webui(root, python, [*flags, "--api"], webui, api_only=False) as base:
        call(base + "/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT,
                                          "forge_additional_modules": [TEXT_ENCODER, VAE]})
        yield base
        assert errors_logged(webui) == []


def test_anima_is_scored_calibrated_judged_and_steered_in_forge_neo(anima):
    plain = txt2img(anima, "Euler", **SIZE)
    assert "Model: random-anima" in json.loads(plain["info"])["infotexts"][0]
    other = txt2img(anima, "Euler", prompt="a blue sports car on a highway at night", **SIZE)
    assert pixels(other["images"][0]) != pixels(plain["images"][0])  # the random model follows its prompt

    watched = txt2img(anima, "Euler", MONITOR, **SIZE)
    got = first(watched)
    print("Anima on Forge Neo, monitored:", got)
    assert pixels(watched["images"][0]) == pixels(plain["images"][0])
    assert float(got["MemoGuard score"]) > 0 and got["MemoGuard verdict"] == "uncalibrated"
    assert got["MemoGuard model"].startswith("unet-") and "MemoGuard error" not in got

    # the words are not explained, and the infotext says why; the image is the plain one
    explained = txt2img(anima, "Euler", EXPLAIN, **SIZE)
    assert pixels(explained["images"][0]) == pixels(plain["images"][0])
    said = first(explained)
    assert NOT_EXPLAINED in said["MemoGuard note"] and "MemoGuard error" not in said and "MemoGuard tokens" not in said

    # calibration from the API: flow prediction, the sampler's first sigma (1), Anima's video latent
    answer = call(anima + ROUTE, dict(SMALL_CALIBRATION, guidance=SIZE["cfg_scale"]))
    print("calibration of Anima on Forge Neo:", json.dumps(answer))
    conditions = json.loads(Path(answer["saved_to"]).read_text())["models"][answer["model_key"]]["conditions"]
    assert answer["model_key"] == got["MemoGuard model"]
    assert conditions["host"] == "forge-neo" and conditions["prediction"] == "flow"
    assert conditions["noise_level"] == pytest.approx(1.0) and conditions["latent"] == [16, 1, 8, 8]
    judged = first(txt2img(anima, "Euler", MONITOR, **SIZE))
    print("Anima on Forge Neo, after calibration:", judged)
    assert judged["MemoGuard verdict"] in ("ok", "flagged") and "MemoGuard note" not in judged
    assert (judged["MemoGuard verdict"] == "flagged") == (float(judged["MemoGuard score"]) >= answer["threshold"])

    # at CFG scale 1 (how guidance-distilled flow models sample) Neo runs no negative pass: MemoGuard's own, once
    plain_cfg1 = txt2img(anima, "Euler", **dict(SIZE, cfg_scale=1))
    cfg1 = txt2img(anima, "Euler", MONITOR, **dict(SIZE, cfg_scale=1))
    at_cfg1 = first(cfg1)
    print("Anima on Forge Neo at CFG scale 1:", at_cfg1)
    assert pixels(cfg1["images"][0]) == pixels(plain_cfg1["images"][0])
    assert at_cfg1["MemoGuard verdict"] in ("ok", "flagged") and "1 extra model call" in at_cfg1["MemoGuard note"]
    # the same first step as at CFG 4 (the same x_T, the prompt against the empty negative)
    assert float(at_cfg1["MemoGuard score"]) == pytest.approx(float(judged["MemoGuard score"]), rel=1e-3)

    # mitigation: the panel's default strategy (padding masking) needs the prompt's words, which a flow model's
    # conditioning does not give the WebUI: the best schedule steers instead, and says so; both schedules run
    for strategy, done in (("mask_padding", "always guidance -3 for "), ("opposite_guidance", "always guidance -3 for "),
                           ("guidance_delay", "always guidance delayed ")):
        steered = txt2img(anima, "Euler", MITIGATE + [strategy], **SIZE)
        fields = first(steered)
        print(f"Anima on Forge Neo, mitigation {strategy}:", fields)
        assert fields["MemoGuard mitigation"].startswith(done) and "MemoGuard error" not in fields
        assert pixels(steered["images"][0]) != pixels(plain["images"][0])
        assert ("instead of mask_padding" in fields.get("MemoGuard note", "")) == (strategy == "mask_padding")


def test_anima_in_the_forge_neo_page_shows_what_it_did_instead(anima):
    """The page as a user has it (the accordion's defaults: padding masking, Explain tokens): the panel under the
    image says that opposite guidance steered instead and why no words are explained, and shows no failure."""
    result = generate_in_a_browser(anima, "forge-neo_anima")
    panel = result["panel"]
    assert "mitigation opposite_guidance instead of mask_padding" in panel
    assert "always guidance -3 for" in panel and NOT_EXPLAINED in panel and "MemoGuard failed" not in panel
