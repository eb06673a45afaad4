#!/usr/bin/env bash
# Run tests/comfyui/test_real_host.py against one ComfyUI checkout + its venv (from any directory).
#   tests/hosts/run_comfyui_real.sh COMFYUI_DIR VENV_DIR [pytest args...]
#   tests/hosts/run_comfyui_real.sh /work/hosts/ComfyUI     /work/hosts/comfy-venv    -rA
#   tests/hosts/run_comfyui_real.sh /work/hosts/ComfyUI-033 /work/hosts/comfy033-venv -rA -k detect
# Browser tests use NODE_PATH (default /work/hosts/pw/node_modules) and CHROMIUM (default /usr/bin/chromium);
# they skip when either is missing.
set -euo pipefail
DIR=${1:?ComfyUI dir}; VENV=${2:?venv dir}; shift 2
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export COMFYUI_DIR=$(cd "$DIR" && pwd)
export COMFYUI_PYTHON=$VENV/bin/python
export NODE_PATH=${NODE_PATH:-/work/hosts/pw/node_modules}
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
cd "$ROOT"
echo "ComfyUI $(cat "$COMFYUI_DIR/.source_commit" 2>/dev/null || echo '?') $("$COMFYUI_PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import comfyui_version; print(comfyui_version.__version__)' "$COMFYUI_DIR")"
exec "$COMFYUI_PYTHON" -m pytest -q tests/comfyui/test_real_host.py "$@"
