#!/usr/bin/env bash
# CPU python 3.11 venv for a real Stable Diffusion WebUI Forge checkout (see checkout_webuis.sh).
#
#   tests/hosts/setup_forge.sh SRC_DIR VENV_DIR [HF_HOME]
#
# SRC_DIR: Forge with repositories/huggingface_guess (+ stable-diffusion-webui-assets); VENV_DIR: created
# if missing (the tests default FORGE_PYTHON to SRC_DIR/venv/bin/python); HF_HOME: default
# $(dirname SRC_DIR)/hf (Forge bundles its model configs; the cache only helps extensions that ask for
# CLIP by name). Needs PyPI (or a pip cache) and the CPU torch wheel pip finds; afterwards Forge starts offline:
#   HF_HUB_OFFLINE=1 VENV/bin/python launch.py --skip-prepare-environment --skip-torch-cuda-test \
#     --skip-version-check --always-cpu --no-half --api --port 7862
# Idempotent: re-running only re-checks.
source "$(dirname "$0")/webui_common.sh"
SRC=$(cd "${1:?SRC_DIR}" && pwd); VENV=${2:?VENV_DIR}; HF=${3:-$(dirname "$SRC")/hf}
mkdir -p "$(dirname "$VENV")"; VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
for d in huggingface_guess/huggingface_guess stable-diffusion-webui-assets; do
  [ -e "$SRC/repositories/$d" ] || { echo "missing $SRC/repositories/$d (run checkout_webuis.sh)" >&2; exit 1; }
done

make_venv "$VENV"
install_torch "$VENV"
install_requirements "$VENV" "$SRC/requirements_versions.txt"
# torchdiffeq/torchsde were missed once by a first pass; clip-anytorch for extensions importing `clip`;
# joblib for the built-in soft-inpainting extension; pytest: the runner of run_forge_real.sh; imagehash: MemoGuard's
# copy evidence
pip_c "$VENV" torchdiffeq==0.2.3 torchsde==0.2.6 clip-anytorch ftfy regex pytest joblib imagehash
pin_setuptools "$VENV"
guard_torchvision "$VENV"
make_hf_cache "$VENV" "$HF"
mkdir -p "$SRC/models/Stable-diffusion"
log "check: Forge modules import"
(cd "$SRC" && HF_HUB_OFFLINE=1 "$VENV/bin/python" -W ignore -c "
import torch, torchvision, transformers, gradio, diffusers, pytorch_lightning, torchsde, pkg_resources
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'gradio', gradio.__version__)
")
log "Forge venv ready: $VENV (HF_HOME=$HF)"
