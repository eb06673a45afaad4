"""train-filter-demo wiring, on a random-weight copy of the bundled architecture at a tiny budget."""
import argparse
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from memoguard.cli import filter_demo  # noqa: E402

TINY = filter_demo.DemoSettings(steps=3, batch=4, warmup=1, duplicated=2, duplicates=3, calibration_samples=16,
                                loss_samples=8, seeds=1, ordinary_prompts=2, sample_steps=2)


def test_fine_tune_set_adds_the_new_captions_duplicated_and_drops_the_bundled_ones(random_model):
    data = filter_demo.finetune_data(random_model.tokenizers[0], TINY, seed=0)
    assert int(data.is_duplicated.sum()) == TINY.duplicated * TINY.duplicates
    assert len(data.ids) == len(data.images) == len(data.is_duplicated)
    titles = filter_demo.NEW_TITLES[:TINY.duplicated]
    assert all(c.endswith(t) for c, t in zip(data.duplicated_captions, titles))
    # the duplicated images are in the set a copy is judged against, once each
    assert len(data.unique_images) == len(data.ids) - TINY.duplicated * (TINY.duplicates - 1)


def test_a_filter_that_drops_everything_leaves_its_run_at_the_base_model(random_model_dir):
    result = filter_demo.run_demo(TINY, seed=0, model_dir=random_model_dir, tau=1e-12, log=lambda *_: None)
    models = result["models"]
    assert list(models) == ["base", "plain", "filtered"]  # a fixed tau: no calibrated per-sample arm
    f = models["filtered"]["filter"]
    assert (f["steps"], f["skipped_steps"], f["drop_rate"], f["drop_rate_ordinary"]) == (TINY.steps, TINY.steps, 1.0, 1.0)
    assert f["drop_rate_duplicated"] in (1.0, None)  # None: no duplicated pair was drawn
    assert models["filtered"]["denoising_loss"] == models["base"]["denoising_loss"]
    assert models["plain"]["denoising_loss"] != models["base"]["denoising_loss"]
    assert models["filtered"]["train_loss_last_steps"] is None
    assert result["summary"]["overhead_per_step"] > 0
    json.dumps(result)  # the --json file


def test_calibrated_filters_compare_relative_gaps_and_only_the_final_one_bars_captions(random_model_dir):
    import dataclasses
    settings = dataclasses.replace(TINY, steps=4, batch=8, duplicates=300, calibration_samples=240, key_warmup=0)
    result = filter_demo.run_demo(settings, seed=0, model_dir=random_model_dir, log=lambda *_: None)
    assert list(result["models"]) == ["base", "plain", "per-sample", "filtered"]
    assert "relative" in result["tau_source"]
    # 5 % of the base model's ordinary relative gaps lie at or above tau: a relative tau sits above 1
    assert 1.0 < result["tau"] < 10.0
    assert len(result["ordinary_gap_by_timestep_band"]) == 10
    per_sample, final = (result["models"][name]["filter"] for name in ("per-sample", "filtered"))
    assert per_sample["barred_captions"] == {}
    for f in (per_sample, final):
        # the overall rate is the mix of the rates on duplicated and ordinary samples
        assert min(f["drop_rate_duplicated"], f["drop_rate_ordinary"]) <= f["drop_rate"] <= max(
            f["drop_rate_duplicated"], f["drop_rate_ordinary"])


def test_bad_tau_is_reported_before_any_work(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    filter_demo.add_arguments(parser)
    args = parser.parse_args(["--tau", "-1", "--model", str(tmp_path / "missing")])
    assert filter_demo.run(args) == 2
    assert "tau must be a finite number > 0" in capsys.readouterr().out
