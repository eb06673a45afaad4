#!/usr/bin/env bash
# Extract a ComfyUI work tree from a bare git dir (as `fetch` leaves it under /work/.mirror) at COMMIT into DEST.
# Snapshots may lack some large blobs (e.g. LLM tokenizer json files, not needed for SD1.x/SDXL); those
# are skipped and listed in DEST/.missing_blobs.txt.
#   tests/hosts/checkout_comfyui.sh /work/.mirror/Comfy-Org+ComfyUI/repo a125cd84 /work/hosts/ComfyUI
#   tests/hosts/checkout_comfyui.sh /work/.mirror/yzkee+ComfyUI/repo 783545f6 /work/hosts/ComfyUI-033
set -euo pipefail
GIT_DIR_=${1:?bare git dir}; COMMIT=${2:?commit}; DEST=${3:?destination}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
missing=$(git --git-dir="$GIT_DIR_" ls-tree -r "$COMMIT" | awk '$2=="blob"{print $3"\t"$4}' |
  while IFS=$'\t' read -r h p; do echo "$h $p"; done |
  awk '{print $1}' | git --git-dir="$GIT_DIR_" cat-file --batch-check | awk '$2=="missing"{print $1}')
excludes=()
: > "$DEST/.missing_blobs.txt"
for h in $missing; do
  p=$(git --git-dir="$GIT_DIR_" ls-tree -r "$COMMIT" | awk -v h="$h" '$3==h{sub(/^[^\t]*\t/,""); print}')
  while IFS= read -r q; do excludes+=(":(exclude)$q"); echo "$q" >> "$DEST/.missing_blobs.txt"; done <<< "$p"
done
index=$(mktemp)
rm -f "$index"
GIT_INDEX_FILE=$index git --git-dir="$GIT_DIR_" --work-tree="$DEST" checkout -f "$COMMIT" -- . "${excludes[@]}"
rm -f "$index"
git --git-dir="$GIT_DIR_" rev-parse "$COMMIT" > "$DEST/.source_commit"
echo "checked out $(cat "$DEST/.source_commit") into $DEST; missing blobs skipped: $(wc -l < "$DEST/.missing_blobs.txt")"
cat "$DEST/.missing_blobs.txt"
