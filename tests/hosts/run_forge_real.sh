#!/usr/bin/env bash
# Real-host suite of the extension against a real Stable Diffusion WebUI Forge (set up by checkout_webuis.sh
# and setup_forge.sh). Extra arguments go to pytest (e.g. -k mitigation); the suite file is added unless one is named.
#
#   tests/hosts/run_forge_real.sh                 # tests/a1111/test_real_forge.py
#
# Env (defaults under HOSTS=/work/hosts): FORGE_KIND (forge, or forge-neo: run_forge_neo_real.sh), FORGE_DIR,
# FORGE_PYTHON (FORGE_DIR/venv/bin/python), FORGE_CKPT
# (HOSTS/models/random-sd15.safetensors), HF_HOME (HOSTS/hf), PYTHON: the test runner's python, which needs
# only pytest and Pillow (default: FORGE_PYTHON, the WebUI's venv; setup_forge.sh installs pytest there). The suite runs
# with --noconftest: tests/conftest.py and tests/a1111/conftest.py belong to the unit tests (torch, memoguard,
# stand-in modules) and the real-host suites define their own fixtures. One WebUI at a time (RAM).
set -euo pipefail
REPO=${MEMOGUARD_REPO:-$(cd "$(dirname "$0")/../.." && pwd)}  # MEMOGUARD_REPO: test another checkout
HOSTS=${HOSTS:-/work/hosts}
export FORGE_KIND=${FORGE_KIND:-forge} FORGE_DIR=${FORGE_DIR:-$HOSTS/forge}
export FORGE_PYTHON=${FORGE_PYTHON:-$FORGE_DIR/venv/bin/python}
export FORGE_CKPT=${FORGE_CKPT:-$HOSTS/models/random-sd15.safetensors}
export HF_HOME=${HF_HOME:-$HOSTS/hf} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the browser check (tests/hosts/setup_browser.sh): playwright-core and Chromium; it skips when either is missing
export NODE_PATH=${NODE_PATH:-$HOSTS/pw/node_modules} CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
PY=${PYTHON:-$FORGE_PYTHON}
for f in "$FORGE_DIR/launch.py" "$FORGE_PYTHON" "$FORGE_CKPT"; do
  [ -e "$f" ] || { echo "missing $f: see tests/hosts/README.md (A1111 / Forge)" >&2; exit 2; }
done
"$PY" -c "import pytest, PIL" 2>/dev/null || {
  echo "the test runner $PY lacks pytest or Pillow: rerun tests/hosts/setup_forge.sh or setup_forge_neo.sh (installs pytest into the WebUI venv) or set PYTHON=..." >&2; exit 2; }
# the suite file unless a test file is named (`-k mitigation` alone would collect every file in tests/a1111)
names_a_file=no
for a in "$@"; do case $a in *.py|*.py::*) names_a_file=yes;; esac; done
[ $names_a_file = yes ] || set -- "$@" test_real_forge.py
cd "$REPO/tests/a1111"
PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} exec "$PY" -m pytest -q -s -rA -p no:cacheprovider --noconftest --rootdir=. "$@"
