"""Copy evidence in the WebUI (stand-in): the accordion judges each image as the WebUI hands it over, before its
infotext is written; the panel shows the card; a folder that is not in models/memoguard_training is a message, not a
lost image; the dropdown entry says where copy evidence runs."""
from pathlib import Path

import pytest

from memoguard.tiny.evalsets import eval_set
from memoguard_a1111.script import ARG_NAMES, MemoGuardAccordion, panel_for
from modules import paths, processing
from test_issue11 import with_accordion
from test_script import infotext_fields, make_p, run

pytest.importorskip("imagehash")
MEMORIZED = "a purple ring, lighthouse poster"


@pytest.fixture()
def training(webui):
    folder = Path(paths.models_path) / "memoguard_training" / "tiny-shapes"
    eval_set("shapes").write_training_folder(folder)
    return folder


def test_each_image_gets_its_nearest_training_image_in_the_infotext_and_the_panel(webui, training):
    p = with_accordion(make_p(webui, prompt=MEMORIZED, batch_size=2, steps=10, cfg_scale=3.0), MemoGuardAccordion(),
                       training_images="tiny-shapes")
    out = processing.process_images(p)
    lines = [infotext_fields(text)["MemoGuard copy evidence"] for text in out.infotexts]
    assert len(lines) == 2 and all(line.startswith("tiny-shapes/") for line in lines)
    assert all("similarity" in line and "no copy threshold for these weights" in line for line in lines)
    assert p.memoguard.evidence.seen == {0: 2}
    assert (Path(paths.models_path) / "memoguard" / "indexes").is_dir()
    html = panel_for(out.js())
    assert html.count('class="memoguard-evidence-card"') == 2 and "copy evidence: tiny-shapes/" in html


def test_a_folder_outside_the_list_is_a_message_and_the_image_is_made(webui, training):
    p = with_accordion(make_p(webui), MemoGuardAccordion(), training_images=str(training))  # a path, not a name
    out = processing.process_images(p)
    assert len(out.images) == 1
    line = infotext_fields(out.infotexts[0])["MemoGuard copy evidence"]
    assert "is not in models/memoguard_training" in line


def test_the_dropdown_entry_says_copy_evidence_runs_in_the_accordion(webui, training):
    monitor, out = run(make_p(webui), training_images="tiny-shapes")
    assert "copy evidence runs in the MemoGuard Monitor accordion" in out.comments
    assert ARG_NAMES[-1] == "training_images"  # the API's script_args end with it (older clients unaffected)
