#!/usr/bin/env bash
# Work trees of the real Automatic1111 v1.10.1 and Forge WebUIs (and A1111's repositories/ at the
# commits its modules/launch_utils.py pins) from local bare git mirrors. Nothing is cloned from the
# internet and nothing of the hosts lands in this repository.
#
#   tests/hosts/checkout_webuis.sh MIRROR_ROOT DEST_ROOT
#
# MIRROR_ROOT holds <owner>+<name>/repo bare git dirs (what the search tool's `fetch` of
# github:avilaops/stable-diffusion-webui, github:lllyasviel/stable-diffusion-webui-forge,
# github:Stability-AI/stablediffusion, github:Stability-AI/generative-models, github:crowsonkb/k-diffusion,
# github:AUTOMATIC1111/stable-diffusion-webui-assets, github:lllyasviel/huggingface_guess leaves in
# /work/.mirror; github:exo101/sd-webui-forge-neo-v3 for Forge Neo 2.26, a repackaging of
# Haoming02/sd-webui-forge-classic's neo branch). Writes DEST_ROOT/a1111, DEST_ROOT/forge and DEST_ROOT/forge-neo
# (existing ones are left alone; Forge Neo only where its mirror is there).
# Override the mirror dir names with A1111_MIRROR=..., FORGE_MIRROR=..., etc.
set -euo pipefail
MIRRORS=${1:?MIRROR_ROOT}; DEST=${2:?DEST_ROOT}
A1111_MIRROR=${A1111_MIRROR:-$MIRRORS/avilaops+stable-diffusion-webui/repo}
FORGE_MIRROR=${FORGE_MIRROR:-$MIRRORS/lllyasviel+stable-diffusion-webui-forge/repo}
SD_MIRROR=${SD_MIRROR:-$MIRRORS/Stability-AI+stablediffusion/repo}
SGM_MIRROR=${SGM_MIRROR:-$MIRRORS/Stability-AI+generative-models/repo}
KD_MIRROR=${KD_MIRROR:-$MIRRORS/crowsonkb+k-diffusion/repo}
ASSETS_MIRROR=${ASSETS_MIRROR:-$MIRRORS/AUTOMATIC1111+stable-diffusion-webui-assets/repo}
HFG_MIRROR=${HFG_MIRROR:-$MIRRORS/lllyasviel+huggingface_guess/repo}
A1111_COMMIT=${A1111_COMMIT:-82a973c04367123ae98bd9abdf80d9eda9b910e2}   # v1.10.1
FORGE_COMMIT=${FORGE_COMMIT:-dfdcbab685e57677014f05a3309b48cc87383167}   # "Fix SD upscale Batch count (#2950)"
NEO_MIRROR=${NEO_MIRROR:-$MIRRORS/exo101+sd-webui-forge-neo-v3/repo}
NEO_COMMIT=${NEO_COMMIT:-5692d2d1e6c293faf5486f7cb18c27c9a3faa758}      # Forge Neo 2.26

# Every mirror first: a missing one otherwise stops the checkout halfway with a bare git error.
missing=()
for mirror in "$A1111_MIRROR" "$FORGE_MIRROR" "$SD_MIRROR" "$SGM_MIRROR" "$KD_MIRROR" "$ASSETS_MIRROR" "$HFG_MIRROR"; do
  [ -d "$mirror" ] || missing+=("$mirror")
done
if [ ${#missing[@]} -gt 0 ]; then
  printf 'missing mirror (fetch github:<owner>/<name> for each, <owner>+<name> in the path):\n' >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

# A git work tree (local clone sharing the mirror's objects) so the WebUIs' own `git describe` works.
worktree() {  # mirror commit dest
  [ -e "$3" ] && { echo "keep $3"; return; }
  git clone -q --shared --no-checkout "$1" "$3"
  git -C "$3" -c advice.detachedHead=false checkout -q "$2"
  echo "$3 at $(git -C "$3" rev-parse --short HEAD)"
}
# A plain tree of the commit a WebUI pins for one of its repositories/ (only the named paths: some
# mirrors lack large sample images, which makes `git archive` abort).
pinned() {  # webui_src var_name mirror dest [paths...]
  local src=$1 var=$2 mirror=$3 dest=$4; shift 4
  local commit
  commit=$(grep -o "$var', \"[0-9a-f]\{40\}\"" "$src/modules/launch_utils.py" | grep -o '[0-9a-f]\{40\}')
  [ -e "$dest" ] && { echo "keep $dest"; return; }
  mkdir -p "$dest"
  local index; index=$(mktemp -u)
  GIT_INDEX_FILE=$index git --git-dir="$mirror" --work-tree="$dest" checkout -q "$commit" -- "${@:-.}"
  rm -f "$index"
  echo "$dest at ${commit:0:8}"
}

worktree "$A1111_MIRROR" "$A1111_COMMIT" "$DEST/a1111"
R=$DEST/a1111/repositories
pinned "$DEST/a1111" STABLE_DIFFUSION_COMMIT_HASH "$SD_MIRROR" "$R/stable-diffusion-stability-ai" ldm configs
pinned "$DEST/a1111" STABLE_DIFFUSION_XL_COMMIT_HASH "$SGM_MIRROR" "$R/generative-models" sgm configs
pinned "$DEST/a1111" K_DIFFUSION_COMMIT_HASH "$KD_MIRROR" "$R/k-diffusion"
pinned "$DEST/a1111" ASSETS_COMMIT_HASH "$ASSETS_MIRROR" "$R/stable-diffusion-webui-assets"

worktree "$FORGE_MIRROR" "$FORGE_COMMIT" "$DEST/forge"
R=$DEST/forge/repositories
pinned "$DEST/forge" HUGGINGFACE_GUESS_HASH "$HFG_MIRROR" "$R/huggingface_guess"
pinned "$DEST/forge" ASSETS_COMMIT_HASH "$ASSETS_MIRROR" "$R/stable-diffusion-webui-assets"

# Forge Neo: the WebUI is the snapshot's webui/ folder; its webui/extensions (about 30 bundled third-party plugins,
# some of their files missing from the snapshot, which makes a whole checkout abort) is left out: a clean host.
if [ -d "$NEO_MIRROR" ] && [ ! -e "$DEST/forge-neo" ]; then
  mkdir -p "$DEST/forge-neo"
  index=$(mktemp -u)
  GIT_INDEX_FILE=$index git --git-dir="$NEO_MIRROR" --work-tree="$DEST/forge-neo" checkout -q "$NEO_COMMIT" -- \
    $(git --git-dir="$NEO_MIRROR" ls-tree --name-only "$NEO_COMMIT" webui/ | grep -vx webui/extensions)
  rm -f "$index"
  mkdir -p "$DEST/forge-neo/webui/extensions"
  echo "$DEST/forge-neo/webui at ${NEO_COMMIT:0:8}"
fi
