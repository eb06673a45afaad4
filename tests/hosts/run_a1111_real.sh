#!/usr/bin/env bash
# Real-host suite of the A1111 extension against a real Automatic1111 WebUI (set up by checkout_webuis.sh
# and setup_a1111.sh). Extra arguments go to pytest (e.g. -k hires); the suite files are added unless one is named.
#
#   tests/hosts/run_a1111_real.sh                 # tests/a1111/test_real_webui.py (SD1.5)
#   A1111_SD2_CKPT=/path/sd2-768v.safetensors tests/hosts/run_a1111_real.sh   # + test_real_webui_sd2.py
#
# Env (defaults under HOSTS=/work/hosts): A1111_DIR, A1111_PYTHON (A1111_DIR/venv/bin/python), A1111_CKPT
# (HOSTS/models/random-sd15.safetensors), HF_HOME (HOSTS/hf), PYTHON: the test runner's python, which needs
# only pytest and Pillow (default: A1111_PYTHON, the WebUI's venv; setup_a1111.sh installs pytest there). The suite runs
# with --noconftest: tests/conftest.py and tests/a1111/conftest.py belong to the unit tests (torch, memoguard,
# stand-in modules) and the real-host suites define their own fixtures. One WebUI at a time (RAM).
set -euo pipefail
REPO=${MEMOGUARD_REPO:-$(cd "$(dirname "$0")/../.." && pwd)}  # MEMOGUARD_REPO: test another checkout
HOSTS=${HOSTS:-/work/hosts}
export A1111_DIR=${A1111_DIR:-$HOSTS/a1111}
export A1111_PYTHON=${A1111_PYTHON:-$A1111_DIR/venv/bin/python}
export A1111_CKPT=${A1111_CKPT:-$HOSTS/models/random-sd15.safetensors}
export HF_HOME=${HF_HOME:-$HOSTS/hf} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the browser check (tests/hosts/setup_browser.sh): playwright-core and Chromium; it skips when either is missing
export NODE_PATH=${NODE_PATH:-$HOSTS/pw/node_modules} CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
PY=${PYTHON:-$A1111_PYTHON}
for f in "$A1111_DIR/launch.py" "$A1111_PYTHON" "$A1111_CKPT"; do
  [ -e "$f" ] || { echo "missing $f: see tests/hosts/README.md (A1111 / Forge)" >&2; exit 2; }
done
"$PY" -c "import pytest, PIL" 2>/dev/null || {
  echo "the test runner $PY lacks pytest or Pillow: rerun tests/hosts/setup_a1111.sh (installs pytest into the WebUI venv) or set PYTHON=..." >&2; exit 2; }
# the suite files unless a test file is named (`-k hires` alone would collect every file in tests/a1111,
# the stand-in unit tests included)
names_a_file=no
for a in "$@"; do case $a in *.py|*.py::*) names_a_file=yes;; esac; done
if [ $names_a_file = no ]; then
  set -- "$@" test_real_webui.py
  [ -z "${A1111_SD2_CKPT:-}" ] || set -- "$@" test_real_webui_sd2.py
fi
# from tests/a1111 with --rootdir=.: the repository root's __init__.py (ComfyUI entry) must not be imported;
# --noconftest: the unit tests' conftests (torch, memoguard, stand-in modules) are not needed here
cd "$REPO/tests/a1111"
PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} exec "$PY" -m pytest -q -s -rA -p no:cacheprovider --noconftest --rootdir=. "$@"
