"""Every number README.md states about MemoGuard, checked against where it comes from: the code's own defaults and
limits, the bundled model and its files, and the measured figures of BENCHMARKS.md (whose commands and raw JSON are
named there). A claim is a phrase that must stand in the README and a check of its number; a README number no claim
covers fails the last test, so a new one needs its source."""
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BENCH = (ROOT / "BENCHMARKS.md").read_text()


def _default(module, qualname, argument):
    """The default of a function's argument."""
    import importlib
    import inspect
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return inspect.signature(target).parameters[argument].default


def _cli_default(command, option):
    from memoguard.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub.get_default(option)


def _json(name):
    return json.loads((ROOT / name).read_text())


def _unet_params(model="tiny-sd", part="unet"):
    from safetensors.torch import load_file
    return sum(t.numel() for t in load_file(ROOT / f"memoguard/assets/{model}/{part}/diffusion_pytorch_model.safetensors")
               .values())


def _ldm(name):
    return _json(f"memoguard/assets/tiny-ldm/{name}")


def _outdoor():
    from memoguard.tiny.outdoor import build_dataset
    return build_dataset(0)


def _unet_config():
    return _json("memoguard/assets/tiny-sd/unet/config.json")


def _benign():
    from memoguard.calibration import default_benign_prompts
    return len(default_benign_prompts())


def _webui_calibrate():
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "a1111" / "standin"))
    sys.path.insert(0, str(ROOT / "a1111_extension"))
    from memoguard_a1111 import calibrate
    return calibrate


def _webui_defaults():
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "a1111" / "standin"))
    sys.path.insert(0, str(ROOT / "a1111_extension"))
    from memoguard_a1111.script import ARG_NAMES, DEFAULTS
    return dict(zip(ARG_NAMES, DEFAULTS))


def _filter():
    return _json("benchmarks/train_filter.json")


def _calibration_fpr(model, detector, variant):
    """Held-out FPR at nominal 1 % of `bench --detection-only` on the bundled ("") or the second ("_ldm") model."""
    return _json(f"benchmarks/bench_detection{model}.json")["calibration_fpr"][detector]["variants"][variant][
        "fpr_at_1pct"]


def _detail_kernel():
    """The side of the local mean `detail_magnitude` subtracts, read off a single-pixel difference."""
    import torch
    from memoguard.score import step_score
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    for k in (3, 5):  # the detail of a spike: 1 - 1/k² at it, -1/k² at its k² - 1 neighbours
        if abs(step_score(spike).item() - (((1 - 1 / k ** 2) ** 2 + (k ** 2 - 1) / k ** 4) / 81) ** 0.5) < 1e-6:
            return k
    return None


def _detector_tpr(model, detector):
    return _json(f"benchmarks/bench_detection{model}.json")["detectors"][detector]["by_outcome"]["steps1_gen1"][
        "tpr_at_1pct_fpr"]


def _bench_says(pattern):
    """The number BENCHMARKS.md states where `pattern` (one group) matches."""
    found = re.search(pattern, BENCH, re.S)
    assert found, pattern
    return found.group(1)


# (phrase in README, check: returns True when the number agrees with its source)
CLAIMS = [
    ("of 1.0 M parameters", lambda: round(_unet_params() / 1e6, 1) == 1.0),
    ("in pixel space at 16×16", lambda: _unet_config()["sample_size"] == 16),
    ("a 2-layer `CLIPTextModel`", lambda: _json("memoguard/assets/tiny-sd/text_encoder/config.json")[
        "num_hidden_layers"] == 2),
    ("1,251 s on 2 shared", lambda: _json("memoguard/assets/tiny-sd/memoguard_training.json")["train_seconds"] == 1251),
    ("24 captions with a unique", lambda: len(__import__("memoguard.tiny.data", fromlist=["x"]).build_dataset(0)
                                               .memorized_captions) == 24),
    ("(32×32 pixels ↔\n8×8×4 latents)", lambda: _ldm("vae/config.json")["sample_size"] == 32
     and len(_ldm("vae/config.json")["block_out_channels"]) == 3 and _ldm("vae/config.json")["latent_channels"] == 4),
    ("of 4.2 M parameters", lambda: round(_unet_params("tiny-ldm") / 1e6, 1) == 4.2),
    ("a 3-layer `CLIPTextModel`", lambda: _ldm("text_encoder/config.json")["num_hidden_layers"] == 3),
    ("(1,539 s on 2 cores", lambda: _ldm("memoguard_training.json")["train_seconds"] == 1539),
    ("(1,857 s on 2 cores)", lambda: _json("memoguard/assets/tiny-flow/memoguard_training.json")["train_seconds"]
     == 1857),
    ("an MMDiT of 1.3 M parameters", lambda: round(_unet_params("tiny-flow", "transformer") / 1e6, 1) == 1.3),
    ("Its 32 memorized", lambda: len(_outdoor().memorized_captions) == 32),
    ("duplicated 10, 20, 40 or 80 times", lambda: sorted(set(_outdoor().memorized_duplicates)) == [10, 20, 40, 80]),
    ("each prompt at 4 seeds", lambda: _parser_default("calibrate", "seeds") == 4),
    ("(**4 UNet evaluations per prompt**;", lambda: _parser_default("calibrate", "seeds") == 4),
    ("1.1 % on\n  both evaluation models", lambda: all(round(_calibration_fpr(m, "detail_magnitude", "every_seed"), 3)
                                                     == 0.011 for m in ("", "_ldm"))),
    ("one seed a prompt gave up to 4.6 %", lambda: round(max(_calibration_fpr(m, d, "one_seed") for m in ("", "_ldm")
                                                            for d in ("magnitude", "detail_magnitude")), 3) == 0.046),
    ("the mean over 4 seeds up to 2.0 %", lambda: round(max(_calibration_fpr(m, d, "seed_mean") for m in ("", "_ldm")
                                                           for d in ("magnitude", "detail_magnitude")), 3) == 0.020),
    ("minus its 3×3", lambda: _detail_kernel() == 3),
    ("a 3×3 average more", lambda: _detail_kernel() == 3),
    ("the nominal 1 % then holds", lambda: _parser_default("scan", "fpr") == 0.01),
    ("Does a calibration's 1 % hold", lambda: "### Does a calibration's 1 % hold" in BENCH),
    ("at a 1 % false-positive rate and the detail 58 % of them", lambda: round(_detector_tpr("_ldm", "detail_magnitude"), 2) == 0.58
     and _detector_tpr("_ldm", "magnitude") == 0.0),
    ("on the bundled model 29 % against 16 %", lambda: round(_detector_tpr("", "detail_magnitude"), 2) == 0.29
     and round(_detector_tpr("", "magnitude"), 2) == 0.16),
    ("`remove_tokens` (up to 3 words left out", lambda: __import__("inspect").signature(
        __import__("memoguard.mitigate", fromlist=["x"]).remove_tokens).parameters["max_removals"].default == 3),
    ("one model call a word, over 12 words on the\n12 a first-order", lambda: __import__(
        "memoguard.explain", fromlist=["x"]).LEAVE_ONE_OUT_MAX_WORDS == 12
     and __import__("memoguard.explain", fromlist=["x"]).SCREENED_WORDS == 12),
    ("long\n  prompts on the 12 words", lambda: __import__("memoguard.explain", fromlist=["x"]).SCREENED_WORDS == 12),
    ("(one extra model call an image with\nwindow 1;", lambda: "step_index(schedule, sigma, self._calls) >= "
     "self.settings.window" in (ROOT / "nodes/monitor_hook.py").read_text()),
    ("(one extra model call an image with window 1,\nsaid in", lambda: "self._pending.step < self.settings.window"
     in (ROOT / "a1111_extension/memoguard_a1111/monitor.py").read_text()),
    ("score the one at CFG 4", lambda: "cfg_scale=4)" in (ROOT / "tests/a1111/test_real_forge_neo_flow.py").read_text()),
    ("and Forge Neo 2.26 (the same Forge suite", lambda: "# Forge Neo 2.26" in (
        ROOT / "tests/hosts/checkout_webuis.sh").read_text()),
    ("Every host scores each prompt at 4 seeds", lambda: _parser_default("calibrate", "seeds") == 4
     and "seeds=range(seed, seed + CALIBRATION_SEEDS)" in (ROOT / "nodes/calibration_run.py").read_text()
     and "seeds=range(CALIBRATION_SEEDS)" in (ROOT / "a1111_extension/memoguard_a1111/calibrate.py").read_text()),
    ("duplicated 40 times", lambda: __import__("inspect").signature(
        __import__("memoguard.tiny.data", fromlist=["x"]).build_dataset).parameters["duplicates"].default == 40),
    ("a `global_step` of 875000", lambda: "875000" in (ROOT / "memoguard/standalone/checkpoints.py").read_text()),
    ("v models are scored at 768 px", lambda: "96x96 latents (768 px)" in (ROOT / "memoguard/standalone/checkpoints.py")
     .read_text()),
    ("eps models at 512 px", lambda: "64x64 (512 px)" in (ROOT / "memoguard/standalone/checkpoints.py").read_text()),
    ("in about 14 s on 2", lambda: _bench_says(r"SD1\.5-size checkpoint: `scan` of one prompt.*?: (\d+) s wall") == "14"),
    ("peak memory 6.3 GiB", lambda: _bench_says(r"SD1\.5-size checkpoint: `scan` of one prompt.*?peak ([\d.]+) GiB")
     == "6.3"),
    ("text encoder's 75 tokens", lambda: __import__("memoguard.model", fromlist=["x"]).TOKENS_PER_CHUNK == 75),
    ("A folder of 10,000 photo-sized images is indexed in 40.4 s", lambda: (_json("benchmarks/index_throughput.json")
     ["images"], _json("benchmarks/index_throughput.json")["index_seconds"]) == (10000, 40.4) and "**40.4 s**" in BENCH),
    ("a 16×16 thumbnail", lambda: __import__("memoguard.evidence", fromlist=["x"]).THUMBNAIL == 16),
    ("mean distance to the next 49", lambda: __import__("memoguard.evidence", fromlist=["x"]).NEIGHBOURS - 1 == 49),
    ("the ratio that 1 % of them reach", lambda: _default("memoguard.evidence", "TrainingIndex.calibrate_copies",
                                                          "fpr") == 0.01),
    ("of at least 100 ordinary generations", lambda: math.ceil(1 / _default(
        "memoguard.evidence", "TrainingIndex.calibrate_copies", "fpr")) == 100),
    ("`--generations` (default\n100)", lambda: _cli_default("index", "generations") == 100),
    ("past CLIP's 75 tokens", lambda: __import__("memoguard.model", fromlist=["x"]).TOKENS_PER_CHUNK == 75),
    ("afresh past 75 tokens", lambda: __import__("memoguard.model", fromlist=["x"]).TOKENS_PER_CHUNK == 75),
    # two chunks cannot repeat into three: a prompt losing its third is padded (memoguard.model.fit_shorter_prompt)
    ("prompt over 150 tokens that", lambda: 2 * __import__("memoguard.model", fromlist=["x"]).TOKENS_PER_CHUNK == 150),
    ("embedded guidance (3.5", lambda: __import__("memoguard.standalone.diffusers_flow",
                                                  fromlist=["x"]).FLUX_EMBEDDED_GUIDANCE == 3.5),
    ("`--batch-size` (default 16", lambda: _parser_default("scan", "batch_size") == 16),
    ("the shipped ~300", lambda: 250 <= _benign() <= 350),
    ("(32 by default", lambda: _parser_default("calibrate", "band_prompts") == 32),
    ("16 hex digits", lambda: len(__import__("memoguard.identity", fromlist=["x"]).weights_fingerprint(
        __import__("torch").nn.Linear(2, 2))) == len("unet-") + 16),
    ("256 evenly spaced values", lambda: "256" in (ROOT / "memoguard/identity.py").read_text()),
    ("holds 50- and 20-step DDIM and t = 999", lambda: len(_json("memoguard/assets/calibration.json")["models"][
        "unet-681368e6af6f82b5"]["other_levels"]) == 2),
    ("(cfg 3.0, where its band was measured)", lambda: _json("memoguard/assets/calibration.json")["models"][
        "unet-681368e6af6f82b5"]["band"]["settings"]["guidance"] == 3.0),
    ("plus 32 full runs for the band", lambda: _comfy_band_default() == 32),
    ('{"prompts": 296,', lambda: _benign() == 296),
    ("of 10 to 10,000 prompts", lambda: _webui_calibrate().LIMITS["prompts"] == (10, 10000)),
    ("at most 2,000 characters", lambda: _webui_calibrate().MAX_PROMPT_CHARS == 2000),
    ("a body over 1 MiB", lambda: _webui_calibrate().MAX_BODY_BYTES == 1 << 20),
    ("exceeds 40,000 UNet evaluations", lambda: _webui_calibrate().MAX_WORK == 40000),
    ("lr 0.05, ≤ 10 iterations", lambda: _webui_defaults()["lr"] == 0.05 and _webui_defaults()["max_iters"] == 10),
    ("`[window=1, threshold=0", lambda: _webui_defaults()["window"] == 1 and _webui_defaults()["threshold"] == 0),
    ("fpr=0.01, explain=false, explain_steps=1", lambda: _webui_defaults()["fpr"] == 0.01
     and _webui_defaults()["explain_steps"] == 1),
    ("max_iters=10, strategy=", lambda: _webui_defaults()["max_iters"] == 10),
    ("delay=0 (0 = the", lambda: _webui_defaults()["delay"] == 0),
    ("early_scale=-3, training_images", lambda: _webui_defaults()["early_scale"] == -3),
    ("0 = 0.2 of them", lambda: __import__("memoguard.mitigate", fromlist=["x"]).OPPOSITE_DELAY == 0.2),
    ("scale*, default −3", lambda: _webui_defaults()["early_scale"] == -3),
    ("0 = 0.3 of them", lambda: __import__("memoguard.mitigate", fromlist=["x"]).DEFAULT_DELAY == 0.3),
    ("steps, default 0.2, guided away", lambda: __import__("memoguard.mitigate", fromlist=["x"]).OPPOSITE_DELAY == 0.2),
    ("at `early_scale`, default -3", lambda: __import__("memoguard.mitigate", fromlist=["x"]).DEFAULT_EARLY_SCALE == -3),
    ("about 11 minutes", lambda: 9 * 60 <= _filter()["seconds_total"] <= 13 * 60),
    ("4 scenes duplicated 400 times", lambda: _filter()["settings"]["duplicated"] == 4
     and _filter()["settings"]["duplicates"] == 400),
    ("copies them in 81 %", lambda: round(100 * _filter()["models"]["plain"]["copy_rate_duplicated"]) == 81),
    ("captions barred, 19 %", lambda: round(100 * _filter()["models"]["filtered"]["copy_rate_duplicated"]) == 19),
    ("1.27× the time per step", lambda: round(_filter()["models"]["filtered"]["seconds_per_step"]
                                              / _filter()["models"]["plain"]["seconds_per_step"], 2) == 1.27),
    ("filter alone, 69 %", lambda: round(100 * _filter()["models"]["per-sample"]["copy_rate_duplicated"]) == 69),
    ("under 3 minutes on 2 CPU cores", lambda: int(_bench_says(r"README's demo command.*?: (\d+) s for")) < 180),
    ("with 4 seeds for the first 10", lambda: _table_constants() == (4, 10)),
    ("the first step × 1 generation, × 4, and ten steps ×\n4.", lambda: _table_constants() == (4, 10)),
    ("bad input is a 400", lambda: "status_code=400" in (ROOT / "a1111_extension/memoguard_a1111/api.py").read_text()),
    ("a body over 1 MiB a 413", lambda: "RequestError(413" in (ROOT / "a1111_extension/memoguard_a1111/api.py").read_text()),
    ("calibration runs a 409", lambda: "status_code=409" in (ROOT / "a1111_extension/memoguard_a1111/api.py").read_text()),
    ("with the\nMonitor (bit-identical image, 1.01× the time)", lambda: _json("benchmarks/comfyui_sdxl_full.json")[
        "monitor"]["bit_identical"] and round(_json("benchmarks/comfyui_sdxl_full.json")["ratios"]["monitored / plain"], 2)
     == 1.01),
    ("first step at t = 999", lambda: any(abs(float(level) - 14.6146) < 0.01 for level in _json(
        "memoguard/assets/calibration.json")["models"]["unet-681368e6af6f82b5"]["other_levels"])),
]


def _parser_default(command, dest):
    from memoguard.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return sub.get_default(dest)


def _table_constants():
    from memoguard.cli import table
    return table.GENERATIONS, table.WINDOW


def _comfy_band_default():
    text = (ROOT / "nodes" / "nodes_calibration.py").read_text()
    return int(re.search(r'io\.Int\.Input\("band_prompts", default=(\d+)', text).group(1))


@pytest.mark.parametrize("phrase, check", CLAIMS, ids=[c[0] for c in CLAIMS])
def test_a_readme_number_agrees_with_its_source(phrase, check):
    assert phrase in README, f"README no longer says {phrase!r}: update the claim"
    assert check(), phrase


# numbers of the README that are not claims about MemoGuard: versions, papers, the API's own names, code examples
# (and what a number means by definition: cfg 1 skips the unconditional pass, 0 = from calibration ...)
NOT_CLAIMS = re.compile(r"v0\.3\.64|0\.33|1\.10\.1|2\.13\.0|3\.10|ICLR 2024|2024|2023|2601\.20642|1024²|512²|"
                        r"SD1(\.[x5])?|SD2(\.x)?|SD3|SDXL|sdapi/v1|/v1/|128x128|16x16|64×64|512x512|"
                        r"TPR@1%FPR|ViT|CLIP-[LG]|L2|x0|ε|2-minute|2 CPU cores|[cC][fF][gG]( scale)? 1\b|"
                        r"other than 1|=0|\(0 =|is 0\)|processes 4|always 3 iterations|iterations 0\.0280|0\.0152|lr=0\.05|"
                        r"max_iters=10|1 − σ|σ = 1|sigma 1\b")


def test_every_number_in_the_readmes_prose_is_a_claim():
    """Outside code blocks and the names above, each number stands inside a claim's phrase."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    prose = re.sub(r"`[^`\n]*`", lambda m: m.group(0) if any(m.group(0) in p for p, _ in CLAIMS) else "", prose)
    covered = [(m.start(), m.end()) for p, _ in CLAIMS for m in re.finditer(re.escape(p), prose)]
    stray = []
    for m in re.finditer(r"(?<![\w.@/-])\d[\d,.]*(?![\w-])", prose):  # numbers, not names like A1111
        if any(a <= m.start() < b for a, b in covered):
            continue
        context = prose[max(0, m.start() - 12):m.end() + 12]
        if not NOT_CLAIMS.search(context):
            stray.append(context.replace("\n", " "))
    assert not stray, stray
