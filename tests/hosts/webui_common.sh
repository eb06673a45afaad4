# Shared steps of setup_a1111.sh and setup_forge.sh (sourced, not run).
# CPU-only python 3.11 venv for a WebUI: torch from the local CPU wheel, the WebUI's pinned
# requirements with torch held there, a torchvision that imports on CPU, and a small HF cache.
set -euo pipefail
HOSTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HOSTS_DIR/../.." && pwd)
PYTHON311=${PYTHON311:-/root/.pyenv/versions/3.11.7/bin/python}
# CPU build, found through pip's find-links (/opt/wheels here; elsewhere e.g. PIP_EXTRA_INDEX_URL=
# https://download.pytorch.org/whl/cpu): the plain PyPI torch wheels are CUDA builds pulling GBs of nvidia packages.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
# The torchvision release made for torch 2.13 (PyPI only has its CUDA-linked build; see guard_torchvision).
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.28.0}

# pip's config here lists local indexes that lack most projects: drop its per-project warnings
quiet_pip() { grep -v "^WARNING: Location 'file://" || true; }

log() { echo "[$(date +%H:%M:%S)] $*"; }

make_venv() {  # venv
  [ -x "$1/bin/python" ] || { log "venv $1"; "$PYTHON311" -m venv "$1"; }
  "$1/bin/python" -m pip install -q --upgrade "pip<25" wheel 2>&1 | quiet_pip
}

install_torch() {  # venv
  local pip="$1/bin/python -m pip"
  log "torch: $TORCH_SPEC, $TORCHVISION_SPEC"
  $pip install -q "$TORCH_SPEC" 2>&1 | quiet_pip
  $pip install -q --no-deps "$TORCHVISION_SPEC" 2>&1 | quiet_pip
  # numpy/pillow for torchvision come with the requirements; keep torch pinned for everything after.
  "$1/bin/python" - "$1/memoguard-constraints.txt" <<'PY'
import sys, importlib.metadata as m
open(sys.argv[1], "w").write(f"torch=={m.version('torch')}\ntorchvision=={m.version('torchvision')}\n")
PY
}

install_requirements() {  # venv requirements_file [extra pip args...]
  local venv=$1 req=$2; shift 2
  local filtered="$venv/memoguard-requirements.txt"
  # the bare `torch` line (and any torch pin) is replaced by the constraint; the WebUIs' setuptools==69.5.1
  # conflicts with torch 2.13's setuptools>=77 requirement: installed afterwards without deps (pytorch_lightning
  # 1.9 imports pkg_resources; torch needs setuptools only to build C++ extensions)
  local setuptools; setuptools=$(grep -oE '^\s*setuptools==[0-9.]+' "$req" || true)
  grep -vE '^\s*(torch|torchvision|setuptools)\s*([=<>!~].*)?(#.*)?$' "$req" > "$filtered"
  log "requirements: $req"
  "$venv/bin/python" -m pip install -q -r "$filtered" -c "$venv/memoguard-constraints.txt" "$@" 2>&1 | quiet_pip
  echo "$setuptools" > "$venv/memoguard-setuptools.txt"
}

pin_setuptools() {  # venv: after the last pip step (any resolve that includes torch lifts setuptools again)
  local spec; spec=$(cat "$1/memoguard-setuptools.txt" 2>/dev/null || true)
  [ -z "$spec" ] || { log "setuptools: $spec (--no-deps)"; "$1/bin/python" -m pip install -q --no-deps "$spec" 2>&1 | quiet_pip; }
  "$1/bin/python" -c "import pkg_resources" 2>/dev/null || { echo "pkg_resources does not import" >&2; return 1; }
}

pip_c() {  # venv args...: pip install with torch held
  local venv=$1; shift
  "$venv/bin/python" -m pip install -q -c "$venv/memoguard-constraints.txt" "$@" 2>&1 | quiet_pip
}

guard_torchvision() {  # venv
  # PyPI's torchvision 0.28.0 is CUDA-linked: its _C does not load against CPU torch, which is fine
  # (the WebUIs use no torchvision C ops), but _meta_registrations.py registers fake kernels for
  # torchvision::nms / qnms unconditionally and then `import torchvision` raises. Make those two
  # registrations conditional on the ops being there, as the others already are. Venv-local edit.
  local venv=$1
  if "$venv/bin/python" -c "import torchvision" 2>/dev/null; then log "torchvision imports as is"; return; fi
  "$venv/bin/python" - <<'PY'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
if "memoguard-guard" not in text:
    path.with_suffix(".py.orig").write_text(text)
    text, n = re.subn(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$',
                      r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))  # memoguard-guard',
                      text, flags=re.M)
    assert n == 2, f"expected 2 unconditional registrations in {path}, found {n}"
    path.write_text(text)
    print(f"guarded {path}")
PY
  "$venv/bin/python" -c "import torchvision, torch; print('torchvision', torchvision.__version__, 'torch', torch.__version__)"
}

make_hf_cache() {  # venv hf_home
  log "HF cache $2 (openai/clip-vit-large-patch14 tokenizer + config)"
  "$1/bin/python" "$HOSTS_DIR/make_clip_hf_cache.py" "$2"
}
