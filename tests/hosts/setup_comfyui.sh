#!/usr/bin/env bash
# Build a CPU Python 3.11 venv for a ComfyUI checkout (offline start-up afterwards).
#   tests/hosts/setup_comfyui.sh SRC_DIR VENV_DIR
#   e.g. tests/hosts/setup_comfyui.sh /work/hosts/ComfyUI     /work/hosts/comfy-venv     (v0.3.64)
#        tests/hosts/setup_comfyui.sh /work/hosts/ComfyUI-033 /work/hosts/comfy033-venv  (0.33.0)
# torch 2.13.0 (CPU wheel, /opt/wheels), then the host's requirements.txt constrained to that torch,
# plus MemoGuard's requirements.txt, requests, websocket-client, pytest (the real-host tests run in this venv).
# PyPI's torchvision 0.28.0 / torchaudio 2.11.1 are CUDA-linked: their shared objects cannot load with
# the CPU torch. Patched inside the VENV only (host source untouched):
#   - torchaudio: the CUDA-linked lib/*.so are deleted; torchaudio then imports as pure Python
#     (_IS_TORCHAUDIO_EXT_AVAILABLE False; functional/transforms work, C++ ops do not).
#   - torchvision: its _C.so does not load (caught by torchvision), and _meta_registrations /
#     _autograd_registrations would then raise "operator torchvision::nms does not exist"; they are
#     imported only when the extension loaded. torchvision.ops C++ kernels are unavailable.
# PYTHON overrides the interpreter (default pyenv 3.11.7); TORCH_VERSION overrides torch.
set -euo pipefail
SRC=${1:?ComfyUI source dir}; VENV=${2:?venv dir}
PYTHON=${PYTHON:-/root/.pyenv/versions/3.11.7/bin/python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -f "$SRC/main.py" ] && [ -f "$SRC/requirements.txt" ] || { echo "not a ComfyUI checkout: $SRC" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip's config here lists local indexes that lack most projects: drop its per-project warnings
quiet_pip() { grep -v "^WARNING: Location 'file://" || true; }
"${PIP[@]}" install -q "torch==$TORCH_VERSION" 2>&1 | quiet_pip
constraints=$(mktemp)
echo "torch==$TORCH_VERSION" > "$constraints"
# requirements.txt may name torchvision/torchaudio without pins; the constraint keeps pip from replacing torch.
# and the node pack's own requirements.txt, as ComfyUI-Manager installs it
PACK=$(cd "$(dirname "$0")/../.." && pwd)
"${PIP[@]}" install -q -c "$constraints" -r "$SRC/requirements.txt" -r "$PACK/requirements.txt" requests websocket-client \
  pytest 2>&1 | quiet_pip
rm -f "$constraints"

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$site/torchaudio/lib" ]; then
  find "$site/torchaudio/lib" -name '*.so' -print -delete | sed 's/^/removed CUDA-linked /'
fi
if [ -f "$site/torchvision/__init__.py" ]; then
  "$VENV/bin/python" - "$site/torchvision/__init__.py" <<'PY'
import sys, re
path = sys.argv[1]
src = open(path).read()
if "MEMOGUARD_CPU_GUARD" not in src:
    old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
    if old not in src:
        sys.exit(f"unexpected torchvision/__init__.py layout in {path}; patch by hand")
    src = src.replace(old, "from torchvision import (\n")
    marker = ")  # usort:skip\n"
    i = src.index(marker, src.index("from torchvision import (")) + len(marker)
    src = src[:i] + ("# MEMOGUARD_CPU_GUARD: the CUDA-linked _C.so does not load with CPU torch; registering meta/autograd\n"
                     "# kernels for its missing operators would raise, so do it only when the extension loaded.\n"
                     "if extension._has_ops():\n"
                     "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n") + src[i:]
    open(path, "w").write(src)
    print("guarded torchvision _meta_registrations/_autograd_registrations")
PY
fi
"$VENV/bin/python" - <<'PY'
import torch, torchvision, torchaudio, torchaudio.functional, torchaudio.transforms
print("torch", torch.__version__, "torchvision", torchvision.__version__, "torchaudio", torchaudio.__version__,
      "cuda", torch.cuda.is_available())
PY
"${PIP[@]}" list 2>/dev/null | grep -iE '^(comfyui[-_]frontend[-_]package|comfyui[-_]workflow[-_]templates|transformers|numpy) ' || true
echo "venv ready: $VENV for $SRC"
