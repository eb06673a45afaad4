#!/usr/bin/env bash
# Real-host suite of the extension against a real Stable Diffusion WebUI Forge (set up by checkout_webuis.sh
# and setup_forge.sh). Extra arguments go to pytest (e.g. -k mitigation).
#
#   tests/hosts/run_forge_real.sh                 # tests/a1111/test_real_forge.py
#
# Env (defaults under HOSTS=/work/hosts): FORGE_DIR, FORGE_PYTHON (FORGE_DIR/venv/bin/python), FORGE_CKPT
# (HOSTS/models/random-sd15.safetensors), HF_HOME (HOSTS/hf), PYTHON: the test runner's python with pytest
# and Pillow (default: the repository's .venv, else python3). One WebUI at a time (RAM).
set -euo pipefail
REPO=${MEMOGUARD_REPO:-$(cd "$(dirname "$0")/../.." && pwd)}  # MEMOGUARD_REPO: test another checkout
HOSTS=${HOSTS:-/work/hosts}
export FORGE_DIR=${FORGE_DIR:-$HOSTS/forge}
export FORGE_PYTHON=${FORGE_PYTHON:-$FORGE_DIR/venv/bin/python}
export FORGE_CKPT=${FORGE_CKPT:-$HOSTS/models/random-sd15.safetensors}
export HF_HOME=${HF_HOME:-$HOSTS/hf} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}
for f in "$FORGE_DIR/launch.py" "$FORGE_PYTHON" "$FORGE_CKPT"; do
  [ -e "$f" ] || { echo "missing $f: see tests/hosts/README.md (A1111 / Forge)" >&2; exit 2; }
done
[ $# -gt 0 ] || set -- test_real_forge.py
cd "$REPO/tests/a1111"
PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} exec "$PY" -m pytest -q -s -rA -p no:cacheprovider --rootdir=. "$@"
