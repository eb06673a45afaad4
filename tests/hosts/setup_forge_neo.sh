#!/usr/bin/env bash
# CPU python 3.11 venv for a real Forge Neo 2.26 (its webui/ folder, from checkout_webuis.sh).
#
#   tests/hosts/setup_forge_neo.sh SRC_DIR VENV_DIR
#
# SRC_DIR: the Forge Neo webui/ folder (writable: at start-up Forge Neo unpacks its bundled tokenizers there);
# VENV_DIR: created if missing. Forge Neo is made for python 3.13; its code has no 3.12+ syntax and its pins have
# cp311 wheels, and the local CPU torch wheel is cp311. Its launcher installs gradio 4.40 (which wants pillow<11)
# before the requirements (Pillow 12.2): done in that order here, pip only warns. Needs PyPI (or a pip cache).
# Forge Neo then starts offline (no --ckpt: POST /sdapi/v1/options {"sd_model_checkpoint": ...} picks the model):
#   HF_HUB_OFFLINE=1 VENV/bin/python launch.py --skip-prepare-environment --skip-version-check --cpu \
#     --ckpt-dirs /work/hosts/models --data-dir DATA --nowebui --api --port 7863 </dev/null
# (stdin closed: with a config.json of another version it asks on stdin.) Idempotent: re-running only re-checks.
source "$(dirname "$0")/webui_common.sh"
SRC=$(cd "${1:?SRC_DIR}" && pwd); VENV=${2:?VENV_DIR}
mkdir -p "$(dirname "$VENV")"; VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
[ -e "$SRC/launch.py" ] && [ -d "$SRC/backend" ] || { echo "$SRC is not Forge Neo's webui/ (run checkout_webuis.sh)" >&2; exit 1; }

make_venv "$VENV"
install_torch "$VENV"
pip_c "$VENV" gradio==4.40.0 gradio_rangeslider==0.0.8
install_requirements "$VENV" "$SRC/requirements.txt"
pip_c "$VENV" pytest imagehash  # imagehash: MemoGuard's copy evidence
pin_setuptools "$VENV"
guard_torchvision "$VENV"
mkdir -p "$SRC/models/Stable-diffusion"
log "check: Forge Neo's modules import"
(cd "$SRC" && HF_HUB_OFFLINE=1 "$VENV/bin/python" -W ignore -c "
import torch, torchvision, transformers, gradio, diffusers, comfy_kitchen, av, spandrel, kornia, pkg_resources
print('torch', torch.__version__, 'transformers', transformers.__version__, 'gradio', gradio.__version__, 'diffusers', diffusers.__version__)
")
log "Forge Neo venv ready: $VENV"
