#!/usr/bin/env bash
# CPU python 3.11 venv for a real Automatic1111 WebUI v1.10.1 checkout (see checkout_webuis.sh).
#
#   tests/hosts/setup_a1111.sh SRC_DIR VENV_DIR [HF_HOME]
#
# SRC_DIR: the WebUI with repositories/ populated; VENV_DIR: created if missing (use SRC_DIR/venv, the
# tests' default A1111_PYTHON); HF_HOME: default $(dirname SRC_DIR)/hf. Needs PyPI (or a pip cache) and the
# CPU torch wheel pip finds (find-links); afterwards the WebUI starts offline:
#   HF_HOME=... HF_HUB_OFFLINE=1 VENV/bin/python launch.py --skip-prepare-environment --skip-torch-cuda-test \
#     --test-server --do-not-download-clip --no-half --use-cpu all --api --port 7861
# Idempotent: re-running only re-checks.
source "$(dirname "$0")/webui_common.sh"
SRC=$(cd "${1:?SRC_DIR}" && pwd); VENV=${2:?VENV_DIR}; HF=${3:-$(dirname "$SRC")/hf}
mkdir -p "$(dirname "$VENV")"; VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
for d in stable-diffusion-stability-ai/ldm generative-models/sgm k-diffusion/k_diffusion stable-diffusion-webui-assets; do
  [ -e "$SRC/repositories/$d" ] || { echo "missing $SRC/repositories/$d (run checkout_webuis.sh)" >&2; exit 1; }
done

make_venv "$VENV"
install_torch "$VENV"
install_requirements "$VENV" "$SRC/requirements_versions.txt"
# k-diffusion imports `clip` (k_diffusion/evaluation.py); not in the WebUI's requirements; pytest: the runner of run_a1111_real.sh;
# imagehash: MemoGuard's copy evidence (README: the WebUI's venv needs it)
pip_c "$VENV" clip-anytorch ftfy regex pytest imagehash
pin_setuptools "$VENV"
guard_torchvision "$VENV"
make_hf_cache "$VENV" "$HF"
mkdir -p "$SRC/models/Stable-diffusion"
log "check: WebUI modules import"
(cd "$SRC" && HF_HOME="$HF" HF_HUB_OFFLINE=1 PYTHONPATH="$SRC/repositories/k-diffusion" "$VENV/bin/python" -W ignore -c "
import torch, torchvision, transformers, gradio, k_diffusion, clip, pytorch_lightning
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'gradio', gradio.__version__)
")
log "A1111 venv ready: $VENV (HF_HOME=$HF)"
