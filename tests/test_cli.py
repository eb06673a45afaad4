"""The command line end to end on the bundled model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from memoguard.calibration import CALIBRATION_SEEDS, Calibration
from memoguard.cli import COMMANDS, main
from memoguard.cli.demo import demo_prompts
from memoguard.tiny.data import build_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(0)


def test_scan_scores_labels_and_writes_json(tmp_path, dataset, capsys):
    rows = [{"prompt": c, "label": 1} for c in dataset.memorized_captions[:6]]
    rows += [{"prompt": s.caption(), "label": 0} for s in dataset.novel_scenes[:6]]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "scan.json"
    assert main(["scan", "--file", str(src), "--out", str(out), "--explain", "2"]) == 0
    data = json.loads(out.read_text())
    assert len(data["results"]) == 12 and 0.0 <= data["summary"]["auc"] <= 1.0
    mem = [r["score"] for r in data["results"] if r["label"] == 1]
    ordinary = [r["score"] for r in data["results"] if r["label"] == 0]
    assert sum(mem) / len(mem) > sum(ordinary) / len(ordinary)
    assert all(len(r["top_tokens"]) == 2 for r in data["results"])
    assert "AUC" in capsys.readouterr().out


def test_scan_csv_and_txt_inputs(tmp_path, capsys):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,label\n"a red circle, on the left",0\na blue ring,1\n,0\n')
    out = tmp_path / "out.csv"
    assert main(["scan", "--file", str(csv_file), "--explain", "0", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("prompt,label,score") and '"a red circle, on the left"' in lines[1]
    assert float(lines[3].split(",")[2]) == pytest.approx(0.0, abs=1e-6)
    assert f"the empty prompt (1 in {csv_file}, the first #2) is the unconditional prompt" in capsys.readouterr().err
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n" + " ".join(["green"] * 90) + "\n")  # second prompt > 77 tokens
    assert main(["scan", "--file", str(txt), "--explain", "1"]) == 0


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "not found"),
    (b"\xff\xfe\x00bad", ".txt", "cannot read"),
    (b"text,label\nx,1\n", ".csv", "needs a 'prompt' column"),
    (b'{"prompt": "a", "label": "maybe"}\n', ".jsonl", "not 1/0/true/false"),
    (b"{broken\n", ".jsonl", "not JSON"),
])
def test_scan_bad_prompt_files_exit_2_with_a_message(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_bytes(content)
    assert main(["scan", "--file", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_calibrate_then_scan_with_it(tmp_path, capsys, tiny_model, random_model_dir):
    cal_file = tmp_path / "cal.json"
    assert main(["calibrate", "--tiny-benign", "--band-prompts", "4", "--band-steps", "10", "--steps", "10",
                 "--out", str(cal_file)]) == 0
    cal = Calibration.load(cal_file, tiny_model.model_key)
    assert len(cal.scores) == 300 * CALIBRATION_SEEDS and cal.threshold(0.01) > cal.scores[600]
    assert cal.detector == "detail_magnitude" and cal.meta["seeds"] == CALIBRATION_SEEDS
    assert cal.conditions["noise_level"] == pytest.approx(tiny_model.noise_level(tiny_model.timesteps(10)[0]))
    assert cal.band is not None and len(cal.band.median) == 10 and cal.band.settings["prompts"] == 4
    # the band spans the whole noise range: from where k-diffusion samplers start (t = 999) to t = 1
    assert cal.band.noise_levels[0] == pytest.approx(tiny_model.noise_level(999))
    assert cal.band.noise_levels[-1] == pytest.approx(tiny_model.noise_level(1))
    capsys.readouterr()
    assert main(["scan", "--prompt", "a red circle", "--calibration", str(cal_file), "--explain", "0",
                 "--steps", "10"]) == 0
    assert "ok" in capsys.readouterr().out
    # the paper's 50-step schedule starts at another noise level than the calibration's: said, not hidden
    assert main(["scan", "--prompt", "a red circle", "--calibration", str(cal_file), "--explain", "0"]) == 0
    assert "first-step noise level" in capsys.readouterr().err
    # a calibration of one model is never applied to another
    assert main(["scan", "--model", str(random_model_dir), "--prompt", "a red circle", "--calibration",
                 str(cal_file), "--explain", "0"]) == 2
    assert "was made for another model" in capsys.readouterr().err


def test_calibrations_are_found_by_model_key(tmp_path, capsys, monkeypatch, random_model_dir):
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path / "store"))
    assert main(["scan", "--model", str(random_model_dir), "--prompt", "a red circle", "--explain", "0"]) == 0
    out = capsys.readouterr()
    assert "uncalibrated" in out.err and "unc." in out.out and "ok" not in out.out.split()
    assert main(["calibrate", "--model", str(random_model_dir), "--tiny-benign", "--band-prompts", "0"]) == 0
    assert len(list((tmp_path / "store").glob("unet-*.json"))) == 1
    capsys.readouterr()
    assert main(["scan", "--model", str(random_model_dir), "--prompt", "a red circle", "--explain", "0"]) == 0
    out = capsys.readouterr()
    assert "uncalibrated" not in out.err and out.out.split()[0] in ("ok", "FLAG")
    # the bundled model keeps its shipped preset, whatever the folder holds
    assert main(["scan", "--prompt", "a purple ring, lighthouse poster", "--explain", "0"]) == 0
    assert capsys.readouterr().out.split()[0] == "FLAG"


def test_corrupt_calibration_is_a_clear_error(tmp_path, capsys, monkeypatch, tiny_model):
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path))
    (tmp_path / f"{tiny_model.model_key}.json").write_text("{half a file")
    assert main(["scan", "--prompt", "a red circle", "--explain", "0"]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_hostile_calibration_files_are_one_line_on_stderr(tmp_path, capsys, monkeypatch, tiny_model,
                                                          hostile_calibration_files):
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path))
    for label, content, words in hostile_calibration_files(tiny_model.model_key):
        (tmp_path / f"{tiny_model.model_key}.json").write_bytes(content)
        assert main(["scan", "--prompt", "a red circle", "--explain", "0"]) == 2, label
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (label, err)


def test_demo_writes_a_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "10"]) == 0
    html = (tmp_path / "report.html").read_text()
    for prompt, _ in demo_prompts():
        assert prompt in html
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) >= 6 * 4
    for png in pngs:
        assert Image.open(png).size[0] > 0
    out = capsys.readouterr()
    assert "first step" in out.err and "wrote" in out.out


def test_bench_quick_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("steps1_gen1", "steps1_gen4", "steps10_gen4"):
        assert 0.0 <= res["detection"][key]["auc"] <= 1.0
        assert 0.0 <= res["detection"][key]["tpr_at_1pct_fpr"] <= 1.0
    methods = res["explanation"]["memorized"]["methods"]
    assert {"leave_one_out", "gradient_x_delta", "integrated_gradients", "gradient_norm", "random",
            "exact_leave_one_out"} <= set(methods)
    for m in methods.values():
        assert 0.0 <= m["top1_ends_flag"] <= 1.0 and m["deletion_auc"] > 0
    # re-encoded leave-one-out is the exact reference it is measured against
    assert methods["leave_one_out"]["top_tokens"] == methods["exact_leave_one_out"]["top_tokens"]
    assert set(res["mitigation"]) == {res["mitigation_default"], "minimize_p50", "opposite_guidance_0.2_s3"}
    for row in res["mitigation"].values():
        for key in ("copy_rate_before", "copy_rate_after", "alignment_before", "alignment_after", "time_ratio"):
            assert 0.0 <= row[key] <= (10.0 if key == "time_ratio" else 1.0)
    assert res["overhead"]["monitor_step_ratio"] > 0
    assert sum(v["positives"] for v in res["labels"].values()) > 0


@pytest.mark.parametrize("command", ["scan --prompt x", "calibrate", "bench --quick --json {out}"])
def test_a_bad_model_path_is_one_line_and_exit_2(tmp_path, capsys, command):
    argv = command.format(out=tmp_path / "r.json").split() + ["--model", str(tmp_path / "missing")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and err.startswith("memoguard ")


def _png_record(path):
    return json.loads(Image.open(path).text["memoguard"])


def test_generate_writes_pngs_with_their_record_and_mitigates(tmp_path, dataset, capsys):
    prompt = dataset.memorized_captions[3]
    plain, fixed = tmp_path / "off", tmp_path / "removed"
    assert main(["generate", "--prompt", prompt, "--seeds", "0,1,2", "--steps", "10", "--out", str(plain)]) == 0
    assert main(["generate", "--prompt", prompt, "--seeds", "0,1,2", "--steps", "10", "--mitigation", "remove_tokens",
                 "--mode", "always", "--out", str(fixed)]) == 0
    lines = [json.loads(line) for line in (fixed / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in lines] == [0, 1, 2]
    for r in lines:
        png = _png_record(fixed / r["file"])
        assert png == r and r["verdict"]["label"] in ("ok", "flagged") and len(r["scores"]) == 10
        assert r["mitigation"]["strategy"] == "remove_tokens"
        assert "MemoGuard: " in Image.open(fixed / r["file"]).text["parameters"]
    off = [json.loads(line) for line in (plain / "results.jsonl").read_text().splitlines()]
    assert all(r["mitigation"] is None for r in off)
    moved = [r for r in lines if r["mitigation"]["removed"]]
    assert moved, "a memorized caption at target = benign median loses at least one token"
    for r in moved:  # the image is the mitigated prompt's, and its score is that prompt's
        before = next(o for o in off if o["seed"] == r["seed"])
        assert r["mitigation"]["after"] < r["mitigation"]["before"] == pytest.approx(before["scores"][0], rel=1e-5)
        assert r["scores"][0] == pytest.approx(r["mitigation"]["after"], rel=1e-4)
        assert not np.array_equal(np.asarray(Image.open(fixed / r["file"])), np.asarray(Image.open(plain / r["file"])))


def test_generate_new_noise_records_the_seed_that_remakes_the_image(tmp_path, dataset):
    """A new initial noise keeps the prompt; its recorded seed, generated plainly, is the same image bit for bit."""
    prompt = dataset.memorized_captions[3]
    fixed = tmp_path / "new_noise"
    assert main(["generate", "--prompt", prompt, "--seeds", "0,1,2,3", "--steps", "10", "--mitigation", "new_noise",
                 "--mode", "always", "--target", "0", "--noise-candidates", "3", "--out", str(fixed)]) == 0
    lines = [json.loads(line) for line in (fixed / "results.jsonl").read_text().splitlines()]
    moved = [r for r in lines if r["mitigation"]["noise_seed"] is not None]
    assert moved and all(r["mitigation"]["prompt_used"].replace(" ", "") == prompt.replace(" ", "") for r in lines)
    for r in moved:
        assert f"seed {r['mitigation']['noise_seed']}" in r["mitigation"]["summary"]
        again = tmp_path / f"again{r['seed']}"
        assert main(["generate", "--prompt", prompt, "--seeds", str(r["mitigation"]["noise_seed"]), "--steps", "10",
                     "--out", str(again)]) == 0
        remade = json.loads((again / "results.jsonl").read_text())
        assert np.array_equal(np.asarray(Image.open(again / remade["file"])), np.asarray(Image.open(fixed / r["file"])))


def test_generate_default_mitigation_masks_the_padding_keeps_the_words_and_records_what_it_zeroed(tmp_path, dataset):
    prompt = dataset.memorized_captions[3]
    masked, plain = tmp_path / "masked", tmp_path / "plain"
    assert main(["generate", "--prompt", prompt, "--seeds", "0,1", "--steps", "10", "--mitigation", "default",
                 "--mode", "always", "--target", "0", "--pad-share", "0.5", "--out", str(masked)]) == 0
    assert main(["generate", "--prompt", prompt, "--seeds", "0,1", "--steps", "10", "--out", str(plain)]) == 0
    off = [json.loads(line) for line in (plain / "results.jsonl").read_text().splitlines()]
    for r, o in zip([json.loads(line) for line in (masked / "results.jsonl").read_text().splitlines()], off):
        m = r["mitigation"]
        assert m["strategy"] == "mask_padding"
        words = len(m["prompt_used"].split())
        assert m["padding_masked"] == (77 - words - 2 + 1) // 2 and f"{m['padding_masked']} padding positions" in m["summary"]
        assert m["prompt_used"].replace(" ", "") == prompt.replace(" ", "") and m["removed"] == []
        assert r["scores"][0] == pytest.approx(m["after"], rel=1e-4) and m["before"] == pytest.approx(o["scores"][0], rel=1e-5)
        assert not np.array_equal(np.asarray(Image.open(masked / r["file"])), np.asarray(Image.open(plain / r["file"])))


@pytest.mark.parametrize("extra, message", [(["--seeds", "0,x"], "--seeds takes integers"),
                                            (["--mitigation", "minimize", "--mode", "auto"], "needs a calibration")])
def test_generate_bad_arguments_are_one_line(tmp_path, capsys, random_model_dir, extra, message):
    argv = ["generate", "--prompt", "a red circle", "--model", str(random_model_dir), "--out", str(tmp_path)] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("memoguard generate:")


def test_generate_out_of_memory_in_mitigation_makes_the_plain_image(tmp_path, capsys, random_model_dir, monkeypatch):
    from memoguard.standalone.diffusers_model import DiffusersModel
    base = ["generate", "--prompt", "a red circle", "--model", str(random_model_dir), "--seeds", "0", "--steps", "3"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    inner = DiffusersModel.raw_prediction

    def raw_prediction(self, x, t, embedding, extra):  # minimization's gradients need more memory than there is
        if embedding.requires_grad:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return inner(self, x, t, embedding, extra)
    monkeypatch.setattr(DiffusersModel, "raw_prediction", raw_prediction)
    capsys.readouterr()
    assert main(base + ["--mitigation", "minimize", "--mode", "always", "--target", "0", "--out", str(tmp_path / "oom")]) == 0
    assert "ran out of memory mitigating" in capsys.readouterr().err
    (record,) = [json.loads(line) for line in (tmp_path / "oom" / "results.jsonl").read_text().splitlines()]
    assert record["mitigation"]["ran"] is False and "out of memory" in record["mitigation"]["error"]
    same = lambda d: np.asarray(Image.open(tmp_path / d / record["file"]))
    assert np.array_equal(same("oom"), same("plain"))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_result(a, b):
    """Two scan records of one prompt computed in different batches: equal up to float rounding. A batch's shared
    unconditional half moves the last float bits, and the stored token shares are rounded to 4 places, so a share
    can differ by one unit of that rounding; comparing them exactly failed on some machines."""
    assert b["score"] == pytest.approx(a["score"], rel=1e-5)
    assert [t for t, _ in b["top_tokens"]] == [t for t, _ in a["top_tokens"]]
    assert [s for _, s in b["top_tokens"]] == pytest.approx([s for _, s in a["top_tokens"]], abs=2e-4)


def test_scan_appends_jsonl_batch_by_batch_resumes_and_writes_a_report(tmp_path, capsys, dataset):
    prompts = [dataset.memorized_captions[0], "a red circle", "a small blue ring", dataset.memorized_captions[5],
               "a green square at the top"]
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "audit.jsonl"
    base = ["scan", "--file", str(src), "--out", str(out), "--explain", "2"]
    assert main(base + ["--batch-size", "2"]) == 0
    first = _lines(out)
    assert [r["index"] for r in first] == [0, 1, 2, 3, 4] and [r["prompt"] for r in first] == prompts
    assert all(r["top_tokens"] and r["explanation_method"] for r in first)
    report = out.with_suffix(".html").read_text()
    assert report.count("<img src='data:image/png;base64,") >= 1 and prompts[0] in report
    capsys.readouterr()
    assert main(base) == 2 and "pass --resume" in capsys.readouterr().err
    # a run that died after 2 prompts, in the middle of writing the third
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:25])
    assert main(base + ["--resume", "--batch-size", "3"]) == 0
    assert "cut off mid-write" in capsys.readouterr().err
    again = _lines(out)
    assert [r["index"] for r in again] == [0, 1, 2, 3, 4]
    for a, b in zip(first, again):  # batches of 2 before, of 3 now: the same numbers up to float rounding
        _assert_same_result(a, b)
    assert main(base + ["--resume"]) == 0 and _lines(out) == again  # nothing left to do
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:1]) + "{broken\n" + "")
    assert main(base + ["--resume"]) == 2 and "audit.jsonl:2 is not a MemoGuard scan result" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("a yellow star\n")
    out.write_text(json.dumps(first[0]) + "\n")
    assert main(["scan", "--file", str(other), "--out", str(out), "--resume"]) == 2
    assert "not in this prompt file" in capsys.readouterr().err


def test_scan_refuses_half_precision_on_the_cpu(capsys):
    assert main(["scan", "--prompt", "a red circle", "--dtype", "fp16"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_table_prints_the_papers_three_rows_and_resumes(tmp_path, capsys, dataset):
    from memoguard.cli.table import table
    from memoguard.standalone.diffusers_model import load_model
    from memoguard.standalone.pipeline import first_step_scores
    memorized, other = tmp_path / "mem.txt", tmp_path / "other.txt"
    memorized.write_text("\n".join(dataset.memorized_captions[:3]) + "\n")
    other.write_text("a red circle\na small blue ring\na green square at the top\n")
    out = tmp_path / "table.jsonl"
    base = ["table", "--memorized", str(memorized), "--other", str(other), "--steps", "12", "--out", str(out)]
    assert main(base + ["--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "first step, 1 generation" in printed and "first 10 steps, 4 generations" in printed
    records = _lines(out)
    assert [r["label"] for r in records] == [1, 1, 1, 0, 0, 0] and all(len(r["gaps"]) == 4 for r in records)
    assert all(len(g) == 10 for r in records for g in r["gaps"])
    model = load_model()
    first = first_step_scores(model, [r["prompt"] for r in records], [0, 1, 2, 3], 12)
    np.testing.assert_allclose([[g[0] for g in r["gaps"]] for r in records], first, rtol=1e-4)
    before = table(records)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:4]))  # a run that stopped after 4
    assert main(base + ["--resume"]) == 0
    assert capsys.readouterr().out == printed and table(_lines(out)) == before
    assert main(base[:-2] + ["--steps", "5"]) == 2 and "at least 10" in capsys.readouterr().err


def test_table_metrics_follow_the_scores():
    from memoguard.cli.table import table
    rec = lambda label, s: {"label": label, "gaps": [[s] * 10] * 4}
    separated = table([rec(1, 0.9), rec(1, 0.8), rec(0, 0.1), rec(0, 0.2)])
    assert all(v["auc"] == 1.0 and v["tpr_at_1pct_fpr"] == 1.0 for v in separated.values())
    assert all(v["auc"] == 0.0 for v in table([rec(1, 0.1), rec(0, 0.9)]).values())


# two CPU processes through torchrun (gloo); `accelerate launch --cpu` would start one
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _scan_on_one_process(tmp_path, prompts):
    """prompts.txt scanned by one process into one.jsonl (one thread, as accelerate sets its processes); the
    environment and the scan arguments up to --out, for the launches to compare with it."""
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    scan = ["-m", "memoguard", "scan", "--file", str(src), "--batch-size", "1", "--explain", "2", "--out"]
    one = subprocess.run([sys.executable, *scan, str(tmp_path / "one.jsonl")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    return env, scan


def test_scan_on_two_processes_merges_into_the_single_process_output(tmp_path):
    """accelerate launch with 2 CPU processes (gloo): the merged JSONL equals one process's, byte for byte (both
    on one thread each, as accelerate sets them)."""
    pytest.importorskip("accelerate")
    env, scan = _scan_on_one_process(tmp_path, ["a purple ring, lighthouse poster", "a red circle", "a small blue ring",
                                                "a green square at the top", "a yellow star"])
    two = subprocess.run([*TWO_PROCESSES, *scan, str(tmp_path / "two.jsonl")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes share the 5 prompts left" in two.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.html", "one.jsonl", "prompts.txt", "two.html",
                                                          "two.jsonl"]  # the shards are merged away


def test_scan_scores_a_prompt_the_same_whatever_it_is_batched_with(tmp_path):
    """A prompt longer than the text encoder's window is encoded in two chunks; the short prompts batched with it
    keep their one-chunk encoding, so each prompt scores as it does alone, and the long one gets a note."""
    from memoguard.cli.scan import scan_batches
    from memoguard.standalone.diffusers_model import load_model
    model = load_model()
    long = ", ".join(["a purple ring on a lighthouse poster"] * 12)
    rows = [("a red circle", None), (long, None), ("a small blue ring", None)]
    together = [r for batch in scan_batches(model, rows, None, explain=2, batch_size=3) for r in batch]
    alone = [r for batch in scan_batches(model, rows, None, explain=2, batch_size=1) for r in batch]
    assert together[1]["tokens"] > 75 >= together[0]["tokens"]
    for a, b in zip(together, alone):
        _assert_same_result(a, b)
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(p for p, _ in rows) + "\n")
    done = subprocess.run([sys.executable, "-m", "memoguard", "scan", "--file", str(src), "--explain", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "1 prompt(s) are longer than the text encoder's 75 tokens (first: #1" in done.stderr


def test_scan_that_fails_mid_run_says_where_the_finished_results_are(tmp_path, capsys, monkeypatch):
    import memoguard.measure
    prompts = ["a red circle", "a small blue ring", "a green square at the top", "a yellow star", "a purple ring"]
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "audit.jsonl"
    base = ["scan", "--file", str(src), "--out", str(out), "--explain", "0", "--batch-size", "2"]
    assert main(base) == 0
    whole = out.read_bytes()
    out.unlink()
    real, calls = memoguard.measure.FirstStep.gaps, []

    def out_of_memory_on_the_second_batch(self, cond):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, cond)
    monkeypatch.setattr(memoguard.measure.FirstStep, "gaps", out_of_memory_on_the_second_batch)
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "stopped after 2 of the 5 prompts this run had to do (out of memory: CUDA out of memory" in err
    assert f"the finished ones are in {out}: run the same command with --resume" in err
    assert len(_lines(out)) == 2
    monkeypatch.setattr(memoguard.measure.FirstStep, "gaps", real)
    assert main(base + ["--resume"]) == 0 and out.read_bytes() == whole


def test_scan_resumes_the_shards_of_a_run_on_several_processes_on_one(tmp_path, capsys):
    """Shards left by a run on 3 processes (one cut off mid-write) are merged on --resume by a single process;
    without --resume they are not overwritten."""
    prompts = ["a red circle", "a small blue ring", "a green square at the top", "a yellow star", "a purple ring",
               "a lighthouse poster"]
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "audit.jsonl"
    # batches of 1: a prompt's score is then the same to the last bit whichever run scans it
    base = ["scan", "--file", str(src), "--out", str(out), "--explain", "0", "--batch-size", "1"]
    assert main(base) == 0
    whole = out.read_bytes()
    lines = whole.decode().splitlines(keepends=True)
    out.unlink()
    (tmp_path / "audit.jsonl.part0").write_text(lines[0] + lines[1])
    (tmp_path / "audit.jsonl.part2").write_text(lines[4] + lines[5][:30])  # the process died writing its second
    capsys.readouterr()
    assert main(base) == 2 and "audit.jsonl.part0 is left from an earlier run" in capsys.readouterr().err
    assert main(base + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming: 3 of 6 prompts are in" in err and "cut off mid-write" in err
    assert out.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.html", "audit.jsonl", "prompts.txt"]


def _worker_pids(rank: int, marker: str):
    """Processes of a launch whose command line holds `marker` and whose environment says RANK=rank (Linux)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in environ:
            found.append(int(pid))
    return found


def test_scan_on_two_processes_loses_nothing_when_one_is_killed(tmp_path):
    """A worker killed mid-run (SIGKILL: no chance to say anything) takes the launch down; its shard keeps the
    batches it finished, and --resume on two processes ends with the single-process output, byte for byte."""
    pytest.importorskip("accelerate")
    import signal
    import time
    if not os.path.isdir("/proc"):
        pytest.skip("finds the worker through /proc")
    colours, shapes = ["red", "blue", "green", "yellow", "purple"], ["circle", "ring", "square", "star"]
    env, scan = _scan_on_one_process(tmp_path, [f"a {c} {s} {where}" for where in ("on a lighthouse poster", "at the top")
                                                for c in colours for s in shapes][:32])
    out = tmp_path / "two.jsonl"
    run = subprocess.Popen([*TWO_PROCESSES, *scan, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    shard, part0 = tmp_path / "two.jsonl.part1", tmp_path / "two.jsonl.part0"
    started = lambda part: part.is_file() and part.read_text().count("\n") >= 1
    deadline = time.time() + 300
    # both processes have finished a batch: each is inside its run (process 0 still loading the model when the
    # launcher stops it would end without its line: the launcher's SIGTERM comes before MemoGuard listens for it)
    while not (started(shard) and started(part0)) and time.time() < deadline:
        assert run.poll() is None, run.communicate()[1][-2000:]
        time.sleep(0.01)
    for pid in _worker_pids(1, str(out)):
        os.kill(pid, signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    # process 0 says where its prompts are, unless it had finished them all and waited for process 1 (a loaded
    # machine schedules the two unevenly): then the launcher stops it inside the wait, and its shard is complete
    finished = part0.is_file() and part0.read_text().count("\n") == 16
    assert finished or ("memoguard scan (process 0 of 2): stopped after" in err
                        and "two.jsonl.part0: run the same command" in err), err[-2000:]
    kept = shard.read_text().count("\n")
    assert 1 <= kept < 16, f"worker 1 was killed after {kept} of its 16 prompts"  # mid-run, finished ones on disk
    again = subprocess.run([*TWO_PROCESSES, *scan, str(out), "--resume"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"prompts are in {out}" in again.stderr
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("two.jsonl.part*"))


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_help_of_every_command_prints_and_exits_cleanly(command, capsys):
    """argparse %-formats help strings: a bare '%' (as in "TPR@1%FPR") ended `--help` in a traceback."""
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0 and "usage: memoguard" in capsys.readouterr().out


def test_a_calibration_serves_only_scores_of_its_own_detector(tmp_path, capsys, monkeypatch):
    """calibrate --detector anisotropy records it; scan judges anisotropy scores against it (by default: it follows
    its calibration), and refuses to judge magnitude scores (another scale) against it."""
    monkeypatch.setenv("MEMOGUARD_CALIBRATIONS", str(tmp_path / "store"))
    assert main(["calibrate", "--tiny-benign", "--band-prompts", "0", "--detector", "anisotropy"]) == 2
    assert "needs --out FILE" in capsys.readouterr().err
    cal_file = tmp_path / "aniso.json"
    assert main(["calibrate", "--tiny-benign", "--band-prompts", "0", "--detector", "anisotropy", "--steps", "10",
                 "--out", str(cal_file)]) == 0
    (entry,) = json.loads(cal_file.read_text())["models"].values()
    assert entry["conditions"]["detector"] == "anisotropy"
    capsys.readouterr()
    scan = ["scan", "--prompt", "a purple ring, lighthouse poster", "--explain", "0", "--steps", "10",
            "--calibration", str(cal_file)]
    assert main(scan + ["--detector", "anisotropy"]) == 0
    chosen = capsys.readouterr().out
    assert chosen.split()[0] in ("FLAG", "ok")
    assert main(scan) == 0 and capsys.readouterr().out == chosen
    assert main(scan + ["--detector", "magnitude"]) == 2
    assert "holds anisotropy scores; this run scores with the magnitude detector" in capsys.readouterr().err


def test_calibration_fpr_bench_measures_held_out_generations(tiny_model):
    """The held-out FPR rows: thresholds fitted on half the prompts, judged on the other half's every generation."""
    from memoguard.cli.bench import calibration_fpr_bench
    from memoguard.tiny.evalsets import eval_set_for
    res = calibration_fpr_bench(tiny_model, eval_set_for(tiny_model).benign_prompts(), 10, seeds=(0, 1), splits=5)
    assert res["held_out_generations"] == res["prompts"] // 2 * 2 and res["detector"] == "detail_magnitude"
    for row in res["variants"].values():
        assert 0.0 <= row["fpr_at_1pct"] <= row["fpr_at_5pct"] <= 0.2  # more allowed, never fewer flagged
        low, high = row["fpr_at_1pct_p10_p90"]
        assert low <= row["fpr_at_1pct"] <= high
