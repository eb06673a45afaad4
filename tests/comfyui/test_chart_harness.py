"""js/memoguard.js in Chromium without ComfyUI (tests/comfyui/chart_harness.mjs): band, window, threshold, single
point, no-band and unavailable texts, hidden progress widget, long token lists. Skipped without node,
playwright-core (NODE_PATH) and Chromium (CHROMIUM, default /usr/bin/chromium)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest


def test_monitor_chart_and_token_panel_in_chromium(tmp_path):
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node") or not os.environ.get("NODE_PATH") or not Path(chromium).exists():
        pytest.skip("needs node, NODE_PATH with playwright-core and Chromium")
    run = subprocess.run(["node", str(Path(__file__).with_name("chart_harness.mjs")), str(tmp_path / "charts.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    assert json.loads(run.stdout)["failures"] == []
