"""The extension inside a real Stable Diffusion WebUI Forge, headless on CPU, through the HTTP API.

Skipped unless FORGE_DIR points to a Forge checkout whose environment is set up (FORGE_PYTHON, default
FORGE_DIR/venv/bin/python, with requirements_versions.txt installed; repositories/huggingface_guess at the
commit Forge pins) and a checkpoint is found (FORGE_CKPT, or the first .safetensors in
FORGE_DIR/models/Stable-diffusion). Run with HF_HUB_OFFLINE=1: Forge's model configs are bundled.
"""
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

import real_checks
from real_checks import EXPLAIN
from real_host import (HIRES, MONITOR_ONLY, call, checkpoint, errors_logged, fields, img2img, infotext, launch_flags,
                       pixels, running_webui, txt2img, webui_log)

FORGE_DIR = os.environ.get("FORGE_DIR")
FORGE_KIND = os.environ.get("FORGE_KIND", "forge")  # or "forge-neo" (tests/hosts/run_forge_neo_real.sh)
pytestmark = pytest.mark.skipif(not FORGE_DIR, reason="FORGE_DIR is not set (path to a Forge checkout with its environment)")
# Forge's API leaves hr_additional_modules None and its hires sampling then fails on `in None` (script on or off);
# Forge Neo lists no latent upscalers and no Lanczos: its "None" upscaler (a plain resize) needs no weights either
FORGE_HIRES = dict(HIRES, hr_additional_modules=["Use same choices"],
                   **({"hr_upscaler": "None"} if FORGE_KIND == "forge-neo" else {}))


@contextmanager
def running_forge(tmp_path_factory, extra_flags=(), api_only=True):
    root = Path(FORGE_DIR)
    python = os.environ.get("FORGE_PYTHON", str(root / "venv" / "bin" / "python"))
    ckpt = checkpoint(root, "FORGE_CKPT")
    data = tmp_path_factory.mktemp("forge-data")
    if FORGE_KIND == "forge-neo":  # Neo lists a whole folder (and its UI picks one of it): a folder of this one alone
        (data / "checkpoints").mkdir()
        (data / "checkpoints" / Path(ckpt).name).symlink_to(Path(ckpt).resolve())
        ckpt = data / "checkpoints" / Path(ckpt).name
    flags = [*launch_flags(FORGE_KIND, ckpt), *extra_flags]
    with running_webui(root, python, flags, data, api_only, select=ckpt if FORGE_KIND == "forge-neo" else None) as base:
        yield base
        assert not errors_logged(data)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    with running_forge(tmp_path_factory) as base:
        yield base


def test_forge_scores_explains_and_leaves_the_image_unchanged(forge):
    assert "memoguard" in call(forge + "/sdapi/v1/scripts")["txt2img"]
    plain = txt2img(forge, "Euler")
    watched = txt2img(forge, "Euler", [1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10])
    print("infotext with MemoGuard on Forge:", infotext(watched))
    got = fields(watched)
    assert float(got["MemoGuard score"]) > 0 and got["MemoGuard verdict"] == "uncalibrated"  # never "ok" uncalibrated
    assert got["MemoGuard tokens"]
    assert pixels(plain["images"][0]) == pixels(watched["images"][0])  # the PNGs differ in their infotext chunk
    callbacks = call(forge + "/memoguard-probe/cfg-callbacks")
    assert not any("RunMonitor" in name for names in callbacks.values() for name in names), callbacks
    assert call(forge + "/memoguard-probe/forge-post-cfg") == []  # patched a clone, not the model's UNet


def test_forge_leave_one_out_re_encodes_through_forge(forge):
    real_checks.leave_one_out_re_encodes_through_the_webui(forge)


def test_forge_textual_inversion_is_one_word_and_re_encoded(forge):
    real_checks.textual_inversion_is_one_word_and_re_encoded(forge)


def test_forge_long_prompts_are_explained_on_the_screened_words(forge):
    real_checks.long_prompts_are_explained_on_the_screened_words(forge)


def test_forge_token_removal_samples_the_prompt_without_its_words(forge):
    real_checks.token_removal_samples_the_prompt_without_its_words(forge)


def test_forge_token_removal_across_a_chunk_is_the_prompt_typed_alone(forge):
    real_checks.token_removal_across_a_chunk_is_the_prompt_typed_alone(forge)


def test_forge_cfg_1_is_scored_with_the_negative_pass_memoguard_runs(forge):
    """The first step's x does not depend on the CFG scale, nor does its gap: at CFG 1, where Forge runs no negative
    pass, MemoGuard's own pass gives the score Forge's own passes give at CFG 7; the words are explained against
    the same negative; the image is Forge's."""
    plain = txt2img(forge, "Euler", cfg_scale=1, negative_prompt="blurry")
    watched = txt2img(forge, "Euler", EXPLAIN, cfg_scale=1, negative_prompt="blurry")
    got = fields(watched)
    print("Forge at CFG 1:", got)
    assert "1 extra model call" in got["MemoGuard note"] and "MemoGuard error" not in got
    assert got["MemoGuard explanation"] == "leave-one-out" and got["MemoGuard tokens"]
    at_cfg7 = fields(txt2img(forge, "Euler", MONITOR_ONLY, negative_prompt="blurry"))["MemoGuard score"]
    assert abs(float(got["MemoGuard score"]) - float(at_cfg7)) <= 1e-4
    assert pixels(plain["images"][0]) == pixels(watched["images"][0])


def test_forge_timestep_sampler_is_scored(forge):
    assert float(fields(txt2img(forge, "DDIM", MONITOR_ONLY))["MemoGuard score"]) > 0


def test_forge_mitigation_optimises_under_inference_mode(forge):
    result = txt2img(forge, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 2, "minimize"])
    print("infotext with mitigation on Forge:", infotext(result))
    mode, iterations, _, before, _, after = fields(result)["MemoGuard mitigation"].split()
    assert (mode, iterations) == ("always", "2") and float(after) < float(before)


def test_forge_guidance_delay_keeps_the_first_step_score_and_steers(forge):
    real_checks.guidance_delay_keeps_the_first_step_score_and_steers(forge)


def test_forge_padding_masking_by_default_and_opposite_guidance(forge):
    real_checks.padding_masking_by_default_and_opposite_guidance(forge)


def test_forge_hires_fix_scores_the_first_pass_only_and_leaves_the_image_unchanged(forge):
    plain = txt2img(forge, "Euler", **FORGE_HIRES)
    watched = txt2img(forge, "Euler", MONITOR_ONLY, **FORGE_HIRES)
    print("infotext with hires fix on Forge:", infotext(watched))
    got = fields(watched)
    assert got["MemoGuard hires pass"] == "not scored"
    assert got["MemoGuard score"] == fields(txt2img(forge, "Euler", MONITOR_ONLY))["MemoGuard score"]  # first pass
    size, data = pixels(watched["images"][0])
    assert size == (128, 128) and (size, data) == pixels(plain["images"][0])


def test_forge_img2img_is_scored_and_leaves_the_image_unchanged(forge):
    init = txt2img(forge, "Euler")["images"][0]
    plain = img2img(forge, "Euler", init)
    watched = img2img(forge, "Euler", init, MONITOR_ONLY)
    print("infotext with img2img on Forge:", infotext(watched))
    assert float(fields(watched)["MemoGuard score"]) > 0
    assert pixels(plain["images"][0]) == pixels(watched["images"][0])


# -- issue 9 (the calibration persists in this module's data dir: these run after the uncalibrated tests) ----------
def test_forge_batch_and_n_iter_infotexts_are_per_image(forge):
    real_checks.batch_infotexts_are_per_image(forge)


def test_forge_invalid_script_args_are_reported_in_info(forge):
    real_checks.invalid_script_args_are_reported(forge)


def test_forge_and_prompt_mitigation_records_the_images_score(forge):
    real_checks.and_prompt_record_is_the_images(forge)


def test_forge_progress_text_is_cleared_after_the_job(forge):
    real_checks.progress_text_is_cleared(forge)


@pytest.fixture(scope="module")
def calibrated(forge):
    return real_checks.calibrate_and_judge(forge, FORGE_KIND)


def test_forge_calibrate_through_the_api_then_the_verdict_uses_it(calibrated):
    assert calibrated["model_key"]


def test_forge_second_checkpoint_is_uncalibrated(forge, calibrated):
    real_checks.second_checkpoint_is_uncalibrated(forge, calibrated, real_checks.checkpoint_b("FORGE_CKPT"))


# -- issue 11 ------------------------------------------------------------------------------------------------------
def test_xyz_plot_over_cfg_with_the_memoguard_accordion(forge):
    real_checks.xyz_over_cfg_with_the_accordion(forge)


def test_interrupt_stops_memoguards_own_work(forge):
    real_checks.interrupt_stops_the_mitigation(forge)


def test_out_of_memory_inside_memoguard_keeps_the_image(forge):
    real_checks.out_of_memory_keeps_the_image(forge)


# -- issue 18: the calibration route behind the WebUI's own API switch and credentials ----------------------------
def test_calibration_route_sits_behind_api_auth_and_its_limits(tmp_path_factory):
    with running_forge(tmp_path_factory, ["--api-auth", ":".join(real_checks.API_USER)]) as base:
        real_checks.route_is_guarded(base, webui_log(base))


def test_the_ui_alone_has_no_calibration_route_and_shows_the_panel_in_a_browser(tmp_path_factory):
    with running_forge(tmp_path_factory, api_only=False) as base:
        real_checks.route_is_absent_without_api(base, webui_log(base))
        real_checks.panel_in_a_browser(base, FORGE_KIND)


def test_four_api_clients_at_once_each_get_their_own_record(forge):
    real_checks.concurrent_clients(forge)


def test_copy_evidence_names_the_nearest_training_image_in_the_infotext(forge):
    real_checks.copy_evidence_in_the_infotext(forge)
