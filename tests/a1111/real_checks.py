"""Issue 9 checks shared by the real A1111 and Forge suites (test_real_webui.py, test_real_forge.py).

Each takes the base URL of a running WebUI (real_host.running_webui) with the random SD1.5 loaded. The
calibration is kept small (10 prompts, one of them two chunks long; 2 band runs of 3 steps, 64x64) so that it
costs CPU seconds.
"""
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
from pathlib import Path

import pytest

from real_host import MONITOR_ONLY, TI_NAME, TI_VECTORS, call, generate, pixels, txt2img, webui_log

ACCORDION = "MemoGuard Monitor"  # the always-visible script's title, its alwayson_scripts key
# 9 short benign prompts and one over 75 tokens (two CLIP chunks): each is scored as if alone
CALIBRATION_PROMPTS = [f"a photo of a {c} {t}" for c in ("red", "blue", "green") for t in ("house", "car", "tree")] + [
    ", ".join(["a small green tree beside a red house"] * 12)]
SMALL_CALIBRATION = dict(prompts=10, band_prompts=2, steps=3, width=64, height=64, prompt_list=CALIBRATION_PROMPTS)
ROUTE = "/memoguard/v1/calibrate"
AND_PROMPT = "a dog AND a photo of a cat"


def all_fields(result):
    """MemoGuard (and other) key/value pairs of every image's infotext."""
    out = []
    for text in json.loads(result["info"])["infotexts"]:
        out.append(dict(part.split(": ", 1) for part in split_params(text.splitlines()[-1]) if ": " in part))
    return out


def first(result):
    return all_fields(result)[0]


def split_params(line):
    """The WebUI's "k: v, k: v" with JSON-quoted values that may hold commas."""
    parts, current, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def unquote(value):
    return json.loads(value) if value.startswith('"') else value


def data_dir(base, saved_to):
    """The WebUI's --data-dir from /sdapi/v1/cmd-flags; Forge dfdcbab6 answers that route with 500, and then the
    folder a calibration was saved in (<data>/models/memoguard/<key>.json) stands in for it."""
    try:
        return Path(call(base + "/sdapi/v1/cmd-flags")["data_dir"])
    except urllib.error.HTTPError:
        print("/sdapi/v1/cmd-flags failed: data dir taken from the calibration's path")
        return Path(saved_to).parents[2]


def post_error(url, payload):
    try:
        call(url, payload)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    raise AssertionError(f"{url} accepted {payload}")


def calibrate_and_judge(base, host):
    """POST /memoguard/v1/calibrate on the loaded checkpoint; the script's verdicts then use it by key."""
    code, body = post_error(base + ROUTE, dict(SMALL_CALIBRATION, prompt_list=CALIBRATION_PROMPTS[:3]))
    assert code == 400 and "prompts" in body["error"], body
    started = time.time()
    answer = call(base + ROUTE, SMALL_CALIBRATION)
    print(f"calibration on {host} ({time.time() - started:.0f} s):", json.dumps(answer))
    assert answer["model_key"].startswith("unet-") and math.isfinite(answer["threshold"]) and answer["band"]
    saved = Path(answer["saved_to"])
    assert saved == data_dir(base, saved) / "models" / "memoguard" / f"{answer['model_key']}.json" and saved.is_file()
    conditions = json.loads(saved.read_text())["models"][answer["model_key"]]["conditions"]
    assert conditions["host"] == host and conditions["prediction"] == "eps" and conditions["latent"] == [4, 8, 8]
    assert not (call(base + "/sdapi/v1/progress")["textinfo"] or "").startswith("MemoGuard")
    got = first(txt2img(base, "Euler", MONITOR_ONLY))
    print(f"infotext after calibration on {host}:", got)
    assert got["MemoGuard model"] == answer["model_key"]
    assert got["MemoGuard verdict"] in ("ok", "flagged") and "MemoGuard percentile" in got
    assert (got["MemoGuard verdict"] == "flagged") == (float(got["MemoGuard score"]) >= answer["threshold"])
    assert "MemoGuard note" not in got and "MemoGuard error" not in got
    return answer


def second_checkpoint_is_uncalibrated(base, calibrated, checkpoint_b):
    """Another checkpoint (random-sd15-b) loaded: its own key, no calibration applies."""
    calibrated_key = calibrated["model_key"]
    folder = data_dir(base, calibrated["saved_to"]) / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / Path(checkpoint_b).name
    if not link.exists():
        link.symlink_to(checkpoint_b)
    call(base + "/sdapi/v1/refresh-checkpoints", {})
    name = Path(checkpoint_b).stem
    titles = [m["title"] for m in call(base + "/sdapi/v1/sd-models") if m["model_name"] == name]
    assert titles, call(base + "/sdapi/v1/sd-models")
    try:
        result = txt2img(base, "Euler", MONITOR_ONLY, override_settings={"sd_model_checkpoint": titles[0]},
                         override_settings_restore_afterwards=True)
        got = first(result)
        print("infotext on the second checkpoint:", got)
        assert got.get("Model") == name or name in json.loads(result["info"])["infotexts"][0]
        assert got["MemoGuard verdict"] == "uncalibrated" and float(got["MemoGuard score"]) > 0
        assert got["MemoGuard model"] != calibrated_key
    finally:
        pass


def batch_infotexts_are_per_image(base):
    """batch_size 2 and n_iter 2: each infotext equals a single-image run of its seed; a threshold between the two
    images' scores flags exactly the image above it; monitor-only batches stay bit-identical."""
    plain = txt2img(base, "Euler", batch_size=2)
    batched = txt2img(base, "Euler", MONITOR_ONLY, batch_size=2)
    assert [pixels(i) for i in plain["images"]] == [pixels(i) for i in batched["images"]]
    per_image = all_fields(batched)
    singles = [first(txt2img(base, "Euler", MONITOR_ONLY, seed=seed)) for seed in (7, 8)]
    print("batch of 2:", [f["MemoGuard score"] for f in per_image], "singles:", [f["MemoGuard score"] for f in singles])
    assert len(per_image) == 2 and per_image[0]["MemoGuard score"] != per_image[1]["MemoGuard score"]
    for got, single in zip(per_image, singles):
        assert abs(float(got["MemoGuard score"]) - float(single["MemoGuard score"])) <= 2e-4, (got, single)
        assert got["MemoGuard verdict"] == single["MemoGuard verdict"]
    iterations = all_fields(txt2img(base, "Euler", MONITOR_ONLY, n_iter=2))
    for got, single in zip(iterations, singles):
        assert abs(float(got["MemoGuard score"]) - float(single["MemoGuard score"])) <= 2e-4, (got, single)
    scores = [float(f["MemoGuard score"]) for f in per_image]
    threshold = round((scores[0] + scores[1]) / 2, 6)
    args = list(MONITOR_ONLY)
    args[1] = threshold
    judged = all_fields(txt2img(base, "Euler", args, batch_size=2))
    verdicts = [f["MemoGuard verdict"] for f in judged]
    print(f"threshold {threshold}:", verdicts)
    assert verdicts == ["flagged" if s >= threshold else "ok" for s in scores] and "flagged" in verdicts


def invalid_script_args_are_reported(base):
    for args, word in ((["abc"], "window"), ([1, 0, "", 0.01, False, 1, "bogus"], "mitigation")):
        result = txt2img(base, "Euler", args)
        got = first(result)
        assert result["images"] and word in unquote(got["MemoGuard error"]), got
        assert "MemoGuard score" not in got
    off = first(txt2img(base, "Euler", [1, 0, "", 0.01, "false"]))
    assert "MemoGuard tokens" not in off and "MemoGuard error" not in off and "MemoGuard score" in off


def and_prompt_record_is_the_images(base):
    plain = first(txt2img(base, "Euler", MONITOR_ONLY, prompt=AND_PROMPT))
    mitigated = first(txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 2, "minimize"],
                              prompt=AND_PROMPT))
    print("AND prompt:", plain["MemoGuard score"], mitigated["MemoGuard mitigation"], mitigated["MemoGuard score"])
    mode, iterations, _, before, _, after = mitigated["MemoGuard mitigation"].split()
    assert abs(float(before) - float(plain["MemoGuard score"])) <= 2e-4
    assert abs(float(after) - float(mitigated["MemoGuard score"])) <= 2e-4 and float(after) < float(before)


def guidance_delay_keeps_the_first_step_score_and_steers(base):
    """Delayed guidance: scored from the same first step, then sampled without text guidance for
    round(delay x steps) steps; a delay that rounds to no step is the plain run."""
    plain = txt2img(base, "Euler", MONITOR_ONLY)
    steps = int(plain["parameters"]["steps"])
    delayed = txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "guidance_delay", 0.5])
    got = first(delayed)
    print("infotext with delayed guidance:", got["MemoGuard mitigation"], got["MemoGuard score"])
    assert got["MemoGuard mitigation"] == f"always guidance delayed {round(0.5 * steps)} steps"
    assert got["MemoGuard score"] == first(plain)["MemoGuard score"]
    assert pixels(delayed["images"][0]) != pixels(plain["images"][0])
    none = txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "guidance_delay", 0.4 / steps])
    assert pixels(none["images"][0]) == pixels(plain["images"][0])


def padding_masking_by_default_and_opposite_guidance(base):
    """The default strategy masks the prompt's padding: the sampler's first step then scores the masked prompt (the
    infotext's "after"; on the random checkpoint it is higher, there is nothing to recall); opposite guidance (0.2
    of the steps at -3) keeps the first step's score."""
    plain = txt2img(base, "Euler", MONITOR_ONLY)
    steps, score = int(plain["parameters"]["steps"]), float(first(plain)["MemoGuard score"])
    masked = txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always"])
    got = first(masked)
    print("infotext with padding masking:", got["MemoGuard mitigation"], got["MemoGuard score"])
    mode, padding, what, positions, _, before, _, after = got["MemoGuard mitigation"].split()
    assert (mode, padding, what) == ("always", "padding", "masked") and int(positions) > 0
    assert abs(float(before) - score) <= 2e-4 and abs(float(after) - float(got["MemoGuard score"])) <= 2e-4
    assert pixels(masked["images"][0]) != pixels(plain["images"][0])
    opposite = txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "opposite_guidance"])
    got = first(opposite)
    print("infotext with opposite guidance:", got["MemoGuard mitigation"], got["MemoGuard score"])
    assert got["MemoGuard mitigation"] == f"always guidance -3 for {round(0.2 * steps)} steps"
    assert got["MemoGuard score"] == first(plain)["MemoGuard score"]
    assert pixels(opposite["images"][0]) != pixels(plain["images"][0])


def progress_text_is_cleared(base):
    txt2img(base, "Euler", MONITOR_ONLY)
    text = call(base + "/sdapi/v1/progress")["textinfo"] or ""
    assert not text.startswith("MemoGuard"), text


def xyz_over_cfg_with_the_accordion(base):
    """X/Y/Z plot over the CFG scale with the MemoGuard accordion on (issue 11): every cell is scored on its own
    infotext, the first-step score is the same in every cell (it does not depend on the scale), and each cell's
    image is the plain run's."""
    xyz = next(s for s in call(base + "/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"])
    cfg_axis = xyz["args"][0]["choices"].index("CFG Scale")
    # x: CFG 3, 7, 11; no y/z; legend, lone images; fixed seeds
    xyz_args = [cfg_axis, "3,7,11", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    # script_name / script_args name X/Y/Z plot here, so the payload is built by hand
    result = generate(base + "/sdapi/v1/txt2img", "Euler", None,
                      dict(script_name="x/y/z plot", script_args=xyz_args,
                           alwayson_scripts={ACCORDION: {"args": [True] + MONITOR_ONLY}}))
    cells = all_fields(result)[1:]  # the grid first, then the three cells
    print("X/Y/Z cells:", [(c.get("CFG scale"), c.get("MemoGuard score"), c.get("MemoGuard verdict")) for c in cells])
    assert [float(c["CFG scale"]) for c in cells] == [3.0, 7.0, 11.0]
    assert len({c["MemoGuard score"] for c in cells}) == 1 and all(c["MemoGuard verdict"] for c in cells)
    assert "MemoGuard error" not in cells[0]
    single = first(txt2img(base, "Euler", MONITOR_ONLY))
    assert abs(float(single["MemoGuard score"]) - float(cells[1]["MemoGuard score"])) <= 2e-4
    plain = txt2img(base, "Euler")
    assert pixels(result["images"][2]) == pixels(plain["images"][0])  # the CFG 7 cell, bit-identical
    assert pixels(result["images"][1]) != pixels(result["images"][3])
    off = txt2img(base, "Euler", None, alwayson_scripts={ACCORDION: {"args": [False] + MONITOR_ONLY}})
    assert "MemoGuard score" not in first(off)


def interrupt_stops_the_mitigation(base):
    """Interrupt a generation a quarter into its minimization: MemoGuard stops with it (issue 11: on Forge all 50
    iterations ran first). Measured side by side with the same run left to finish; 12 iterations, as a backward
    pass of SD1.5 takes seconds on CPU (50 iterations took 422 s)."""
    import threading
    args = [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 12, "minimize"]
    started = time.time()
    txt2img(base, "Euler", args)
    full = time.time() - started
    out = {}
    worker = threading.Thread(target=lambda: out.update(result=txt2img(base, "Euler", args)))
    started = time.time()
    worker.start()
    time.sleep(full / 4)
    call(base + "/sdapi/v1/interrupt", {})
    worker.join()
    stopped = time.time() - started
    got = first(out["result"])
    print(f"12 iterations: {full:.1f} s; interrupted at {full / 4:.1f} s, returned after {stopped:.1f} s;", got)
    assert stopped < full / 2 and "interrupted" in unquote(got["MemoGuard error"])


def out_of_memory_keeps_the_image(base):
    """Out of memory inside explanation and inside minimization (injected by the probe): the image is the plain
    run's, the score is still there, and the infotext says what happened (issue 11)."""
    plain = txt2img(base, "Euler")
    call(base + "/memoguard-probe/out-of-memory/1", {})
    try:
        for args in ([1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10],
                     [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 3, "minimize"]):
            result = txt2img(base, "Euler", args)
            got = first(result)
            print("out of memory:", got.get("MemoGuard error"))
            assert pixels(result["images"][0]) == pixels(plain["images"][0])
            assert "ran out of memory" in unquote(got["MemoGuard error"]) and float(got["MemoGuard score"]) > 0
    finally:
        call(base + "/memoguard-probe/out-of-memory/0", {})
    assert "MemoGuard error" not in first(txt2img(base, "Euler", [1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10]))


# issue 20: a prompt with emphasis, BREAK and prompt editing (its first-step text ends in "hill"), and what the WebUI
# would get without each of three words, written out
EDITED_PROMPT = "a (red:1.3) house BREAK on a [hill:field:2]"
WITHOUT_WORD = {"red": "a house BREAK on a hill", "house": "a (red:1.3) BREAK on a hill",
                "hill": "a (red:1.3) house BREAK on a"}
EXPLAIN = [1, 0, "", 0.01, True, 1, "off", 0, 0.05, 10]


def leave_one_out_re_encodes_through_the_webui(base):
    """The default explanation leaves each word out of the prompt and encodes it again through the WebUI's own
    conditioning: a word's score is the first-step gap of the prompt minus that of the prompt without the word, as
    the WebUI samples it (weights, BREAK and the first step's prompt edit kept)."""
    got = first(txt2img(base, "Euler", EXPLAIN, prompt=EDITED_PROMPT))
    print("explanation with emphasis, BREAK and prompt editing:", got)
    assert unquote(got["MemoGuard explanation"]) == "leave-one-out" and "MemoGuard error" not in got
    explained = call(base + "/memoguard-probe/explanation")
    assert explained["method"] == "leave_one_out"
    assert explained["tokens"] == ["a", "red", "house", "on", "a", "hill"], explained["tokens"]
    root = math.sqrt(explained["elements"])  # scores are L2 gaps, the infotext score an RMS
    assert explained["gap"] == pytest.approx(explained["score"] * root, rel=1e-4)
    pairs = {}
    for word, shorter in WITHOUT_WORD.items():
        txt2img(base, "Euler", MONITOR_ONLY, prompt=shorter)
        drop = (explained["score"] - call(base + "/memoguard-probe/explanation")["score"]) * root
        pairs[word] = (explained["scores"][explained["tokens"].index(word)], drop)
        print(f"without {word!r}: leave-one-out {pairs[word][0]:.6f}, the WebUI's own run {drop:.6f} "
              f"(gap {explained['gap']:.4f})")
    # (the WebUI's "Original" emphasis rescales by the mean over the prompts encoded together: each shorter prompt
    # is encoded alone, as the WebUI encodes it generated alone; encoded beside the original, "red" was 3e-4 of the
    # gap off)
    for word, (score, drop) in pairs.items():
        assert score == pytest.approx(drop, rel=1e-3, abs=1e-4 * explained["gap"]), word


def textual_inversion_is_one_word_and_re_encoded(base):
    """An embedding of several vectors is one word of the explanation, named by its name (not CLIP's pieces of it),
    and leave-one-out measures it: its score is the WebUI's own run of the prompt without the embedding."""
    prompt = f"a red {TI_NAME} house on a hill"
    got = first(txt2img(base, "Euler", EXPLAIN, prompt=prompt))
    print("explanation with a textual-inversion embedding:", got)
    assert TI_NAME in got.get("TI hashes", "") + got.get("TI", ""), got  # the WebUI used the embedding
    assert unquote(got["MemoGuard explanation"]) == "leave-one-out" and "MemoGuard error" not in got, got
    explained = call(base + "/memoguard-probe/explanation")
    assert explained["method"] == "leave_one_out"
    assert explained["tokens"] == ["a", "red", TI_NAME, "house", "on", "a", "hill"], explained["tokens"]
    root = math.sqrt(explained["elements"])
    txt2img(base, "Euler", MONITOR_ONLY, prompt="a red house on a hill")
    drop = (explained["score"] - call(base + "/memoguard-probe/explanation")["score"]) * root
    score = explained["scores"][2]
    print(f"without {TI_NAME!r} ({TI_VECTORS} vectors): leave-one-out {score:.6f}, the WebUI's own run {drop:.6f}")
    assert score == pytest.approx(drop, rel=1e-3, abs=1e-4 * explained["gap"])


LONG_PROMPT = "a red house on a green hill under a blue sky with white clouds and a small yellow dog"


def long_prompts_are_explained_on_the_screened_words(base):
    """Over 12 words the default measures the 12 words a first-order estimate ranks first (a backward pass through
    the WebUI's model): the top word's score is the WebUI's own run of the prompt without it."""
    words = LONG_PROMPT.split()
    got = first(txt2img(base, "Euler", EXPLAIN, prompt=LONG_PROMPT))
    assert unquote(got["MemoGuard explanation"]) == "leave-one-out of the likeliest words", got
    assert "MemoGuard error" not in got
    explained = call(base + "/memoguard-probe/explanation")
    assert explained["method"] == "leave_one_out_screened" and explained["tokens"] == words
    assert sum(explained["measured"]) == 12
    top = max((i for i, m in enumerate(explained["measured"]) if m), key=lambda i: explained["scores"][i])
    assert all(s == 0.0 for s, m in zip(explained["scores"], explained["measured"]) if not m)
    txt2img(base, "Euler", MONITOR_ONLY, prompt=" ".join(w for i, w in enumerate(words) if i != top))
    root = math.sqrt(explained["elements"])
    drop = (explained["score"] - call(base + "/memoguard-probe/explanation")["score"]) * root
    print(f"screened top word {words[top]!r}: leave-one-out {explained['scores'][top]:.6f}, the WebUI's run {drop:.6f}")
    assert explained["scores"][top] == pytest.approx(drop, rel=1e-3, abs=1e-4 * explained["gap"])


def token_removal_samples_the_prompt_without_its_words(base):
    """Token removal: the infotext names the words left out, and the image's first step is the WebUI's own run of
    the prompt without them."""
    prompt = "a red house on the hill"  # every word once: the shorter prompt follows from the removed words
    got = first(txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "remove_tokens"],
                        prompt=prompt))
    print("token removal:", got.get("MemoGuard mitigation"), got.get("MemoGuard error"))
    mode, action, *words, before, arrow, after = unquote(got["MemoGuard mitigation"]).split()
    assert (mode, action, arrow) == ("always", "removed", "->") and words and float(after) < float(before)
    mitigated = call(base + "/memoguard-probe/explanation")["score"]
    assert mitigated == pytest.approx(float(after), abs=6e-5)
    txt2img(base, "Euler", MONITOR_ONLY, prompt=" ".join(w for w in prompt.split() if w not in words))
    assert mitigated == pytest.approx(call(base + "/memoguard-probe/explanation")["score"], rel=1e-3)


# 76 words of one CLIP token each, no comma: two chunks (75 + 1); any word left out makes it one
CHUNK_EDGE_PROMPT = (
    "red green blue white black yellow orange purple brown gray house tree car road river lake hill mountain sky cloud "
    "sun moon star night day morning evening summer winter spring autumn snow rain wind storm field forest garden "
    "flower grass stone rock sand beach ocean wave boat ship bridge tower castle church city town street window door "
    "roof wall floor table chair bed lamp book paper glass bottle cup plate bowl apple bread cheese fish bird")


def token_removal_across_a_chunk_is_the_prompt_typed_alone(base):
    """Words left out of a two-chunk prompt leave one chunk: the image is the WebUI's own of the prompt typed without
    them, generated alone (one chunk, not the shorter prompt padded with an empty chunk), up to float rounding."""
    settings = dict(prompt=CHUNK_EDGE_PROMPT, steps=8)
    result = txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "remove_tokens"], **settings)
    got = first(result)
    mode, action, *words, before, arrow, after = unquote(got["MemoGuard mitigation"]).split()
    assert (mode, action, arrow) == ("always", "removed", "->") and words and "MemoGuard error" not in got
    mitigated = call(base + "/memoguard-probe/explanation")["score"]
    typed = txt2img(base, "Euler", MONITOR_ONLY, **dict(settings, prompt=" ".join(
        w for w in CHUNK_EDGE_PROMPT.split() if w not in words)))
    assert mitigated == pytest.approx(call(base + "/memoguard-probe/explanation")["score"], rel=1e-3)
    (_, a), (_, b) = pixels(result["images"][0]), pixels(typed["images"][0])
    differ = sum(abs(x - y) for x, y in zip(a, b)) / len(a)
    print(f"removed {words}: mean abs pixel difference from the typed prompt {differ:.3f} (of 255)")
    assert differ < 1.0


def checkpoint_b(ckpt_env):
    first = Path(os.environ.get(ckpt_env) or "/work/hosts/models/random-sd15.safetensors")
    return os.environ.get("MEMOGUARD_CKPT_B") or str(first.with_name("random-sd15-b.safetensors"))


# -- the calibration route's guards (issue 18) ------------------------------------------------------------------
API_USER = ("alice", "s3cret-pw")  # --api-auth alice:s3cret-pw (A1111 1.10 refuses a ':' in a password)
SLOW_CALIBRATION = dict(prompts=40, band_prompts=8, steps=10, width=64, height=64)  # minutes on a CPU


def _status(url, payload, auth=None, timeout=1200):
    try:
        call(url, payload, timeout=timeout, auth=auth)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def _oversized_refused(url, payload) -> bool:
    """A body over the route's limit: 413, or the connection closed while the client still sent (the server
    answers 413 from the declared length without reading the body; which of the two a client sees is a race)."""
    try:
        return _status(url, payload, auth=API_USER) == 413
    except urllib.error.URLError as e:
        return isinstance(e.reason, (BrokenPipeError, ConnectionResetError))


def route_is_guarded(base, log: Path):
    """A WebUI started with --api-auth: the route answers 401 as /sdapi/v1/* does, refuses oversized requests,
    runs one calibration at a time (409), and a client that leaves cancels its calibration."""
    import threading
    assert _status(base + "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1}) == 401
    assert _status(base + ROUTE, SMALL_CALIBRATION) == 401
    assert _status(base + ROUTE, SMALL_CALIBRATION, auth=("alice", "wrong")) == 401
    assert _oversized_refused(base + ROUTE, {"prompt_list": ["a cat"] * 200_000})
    for bad in ({"batch_size": -3}, {"batch_size": 10 ** 9},
                {"prompts": 296, "band_prompts": 10000, "steps": 150, "width": 4096, "height": 4096}):
        assert _status(base + ROUTE, bad, auth=API_USER) == 400, bad
    first = {}
    worker = threading.Thread(target=lambda: first.update(code=_status(base + ROUTE, SMALL_CALIBRATION, auth=API_USER)))
    worker.start()
    time.sleep(3)
    try:
        call(base + ROUTE, SMALL_CALIBRATION, auth=API_USER)
        raise AssertionError("a second calibration was accepted while the first ran")
    except urllib.error.HTTPError as e:
        answer = json.loads(e.read())
        assert e.code == 409 and "already running" in answer["error"] and "API client 127.0.0.1" in answer["error"]
    worker.join()
    assert first["code"] == 200
    # a client that gives up after 5 s: its calibration stops at its next batch; the WebUI is free again
    try:
        call(base + ROUTE, SLOW_CALIBRATION, auth=API_USER, timeout=5)
    except OSError:  # the read timed out: this client closed its connection
        pass
    deadline = time.time() + 120
    while "calibration cancelled" not in log.read_text():
        assert time.time() < deadline, "the calibration of a client that left went on"
        time.sleep(2)
    assert _status(base + ROUTE, SMALL_CALIBRATION, auth=API_USER) == 200


def route_is_absent_without_api(base, log: Path):
    """A WebUI started with its UI and without --api serves no /sdapi/v1/* and no calibration route."""
    assert _status(base + ROUTE, SMALL_CALIBRATION) == 404
    assert f"{ROUTE} is off" in log.read_text()


def concurrent_clients(base):
    """Issue 18, load: four API clients at once (txt2img with the script, with the accordion and a batch of 2, with
    delayed guidance, and a calibration). Each image's score is the one its request gets alone, and each verdict
    agrees with the calibration that existed when that generation ran: none, or the one the request saved."""
    import threading
    requests = {
        "script": lambda: txt2img(base, "Euler", MONITOR_ONLY, prompt="a red house on a hill", seed=11),
        "accordion": lambda: txt2img(base, "Euler", None, prompt="a blue car in the rain", seed=12, batch_size=2,
                                     alwayson_scripts={ACCORDION: {"args": [True] + MONITOR_ONLY}}),
        "delay": lambda: txt2img(base, "Euler", [1, 0, "", 0.01, False, 1, "always", 0, 0.05, 10, "guidance_delay"],
                                 prompt="a green tree by a lake", seed=13),
        "calibration": lambda: call(base + ROUTE, SMALL_CALIBRATION),
    }
    together, errors = {}, []

    def run(name):
        try:
            together[name] = requests[name]()
        except Exception as e:  # reported below with its request
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    threshold = together["calibration"]["threshold"]
    for name in ("script", "accordion", "delay"):
        alone = requests[name]()
        got, ref = all_fields(together[name]), all_fields(alone)
        assert len(got) == len(ref) == (2 if name == "accordion" else 1)
        for image, (a, b) in enumerate(zip(got, ref)):
            assert a["MemoGuard score"] == b["MemoGuard score"] and a["MemoGuard model"] == b["MemoGuard model"], (name, image)
            if a["MemoGuard verdict"] != "uncalibrated":  # ran after a calibration was saved: judged by it
                assert (a["MemoGuard verdict"] == "flagged") == (float(a["MemoGuard score"]) >= threshold), (name, a)
        assert pixels(together[name]["images"][0]) == pixels(alone["images"][0]), name


ARTIFACTS = Path(os.environ.get("MEMOGUARD_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "memoguard-test-artifacts"))


def generate_in_a_browser(base, name: str) -> dict:
    """The WebUI's own page in Chromium (browser_check_webui.mjs): the accordion enabled, Explain tokens on and
    Mitigation "always" with the defaults, Generate clicked; its result (the strategy radio, the labels, the panel's
    text, MemoGuard's page errors). Screenshots of the accordion and the panel land in ARTIFACTS as
    NAME_memoguard.png and NAME_memoguard_panel.png for a person to look at."""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not os.environ.get("NODE_PATH") or not Path(chromium).exists():
        pytest.skip("needs node, NODE_PATH with playwright-core and Chromium (tests/hosts/setup_browser.sh)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{name}_memoguard.png"
    run = subprocess.run(["node", str(Path(__file__).with_name("browser_check_webui.mjs")), base,
                          "a purple ring, lighthouse poster", str(shot)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{name} panel:", result["panel"])
    assert not result["errors"], result["errors"]
    assert shot.stat().st_size > 10000
    return result


def panel_in_a_browser(base, name: str):
    """generate_in_a_browser on an SD checkpoint: the panel under the image shows the words by leave-one-out and
    the padding masking."""
    result = generate_in_a_browser(base, name)
    assert result["strategy"] == {"choices": ["mask_padding", "opposite_guidance", "guidance_delay", "remove_tokens",
                                              "minimize"], "value": "mask_padding"}, result["strategy"]
    assert "Opposite guidance scale" in result["labels"] and "padding masked" in result["panel"]
    assert "tokens: leave-one-out" in result["panel"]  # the default explanation, re-encoded by the WebUI


def copy_evidence_in_the_infotext(base):
    """Copy evidence with the accordion (issue 22, item 2): each image's infotext names its nearest image of a folder
    picked by name from models/memoguard_training; once the generated image itself is in the folder (re-indexed: the
    folder changed) and a copy threshold is stored for the weights' key, the same generation is judged a copy of it;
    the image is the plain run's throughout; a name that is not in the list is a message, and the image is made."""
    import base64

    import numpy as np
    from PIL import Image

    from memoguard.evidence import TrainingIndex
    data = webui_log(base).parent
    folder = data / "models" / "memoguard_training" / "pictures"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    smooth = lambda: np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64)))
    for i in range(20):
        Image.fromarray(smooth()).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"picture {i}")
    args = lambda name: {ACCORDION: {"args": [True] + MONITOR_ONLY + ["mask_padding", 0, "auto", -3, name]}}
    before = txt2img(base, "Euler", None, alwayson_scripts=args("pictures"))
    fields = first(before)
    line = unquote(fields["MemoGuard copy evidence"])
    print("copy evidence before:", line)
    assert line.startswith("pictures/") and "similarity" in line and "no copy threshold" in line
    (folder / "generated.png").write_bytes(base64.b64decode(before["images"][0]))
    (folder / "generated.txt").write_text("the generation itself")
    index = TrainingIndex.open(folder, data / "models" / "memoguard" / "indexes")
    index.calibrate_copies(fields["MemoGuard model"], np.stack([smooth() for _ in range(100)]), note="test")
    index.save_to(data / "models" / "memoguard" / "indexes")
    after = txt2img(base, "Euler", None, alwayson_scripts=args("pictures"))
    line = unquote(first(after)["MemoGuard copy evidence"])
    print("copy evidence after:", line)
    assert line.startswith("pictures/generated.png, similarity 1.000, COPY")
    plain = txt2img(base, "Euler")
    assert pixels(after["images"][0]) == pixels(plain["images"][0]) == pixels(before["images"][0])
    missing = txt2img(base, "Euler", None, alwayson_scripts=args("no-such-folder"))
    assert "is not in models/memoguard_training" in unquote(first(missing)["MemoGuard copy evidence"])
    assert pixels(missing["images"][0]) == pixels(plain["images"][0])
