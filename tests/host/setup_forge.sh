#!/usr/bin/env bash
# Build a real stable-diffusion-webui-forge host, offline, OUTSIDE this repository, for the Forge
# host test tier (tests/host/forge/). Re-runnable: every step is skipped when already done.
#
# Inputs (env vars; defaults are where the `fetch` tool puts the public snapshots):
#   FORGE_GIT     git dir of lllyasviel/stable-diffusion-webui-forge holding FORGE_COMMIT
#   FORGE_COMMIT  the Forge commit to build (default dfdcbab685e5…, main of 2025-06-26: the pinned one)
#   ASSETS_GIT HFGUESS_GIT BLIP_GIT   git dirs of the three repositories Forge clones into
#                 repositories/ (commits pinned in its modules/launch_utils.py, copied below):
#                 AUTOMATIC1111/stable-diffusion-webui-assets, lllyasviel/huggingface_guess,
#                 salesforce/BLIP (checked out sparsely without BLIP.gif: snapshots lack files ≥ 4 MiB).
#   FORGE_DIR     where to put Forge                 (default /work/host/forge)
#   VENV_DIR      where to put its Python venv       (default /work/host/forge-venv)
#   PYTHON        interpreter for the venv           (default python3.11, else python3; must be 3.10/3.11)
#   REPO_ROOT     this project (for requirements.txt) (default: two levels above this script)
#
# With --skip-prepare-environment (how the tests start it) Forge clones nothing and installs nothing,
# and runs no extension's install.py: this script does all of that once.
#
# Usage:  bash tests/host/setup_forge.sh
# Then:   pytest tests/host/forge        (see tests/host/README.md, "Forge tier")
#
# Nothing of Forge is ever copied into this project.
set -euo pipefail

MIRROR=${MIRROR:-/work/.mirror}
FORGE_GIT=${FORGE_GIT:-$MIRROR/lllyasviel+stable-diffusion-webui-forge/repo}
FORGE_COMMIT=${FORGE_COMMIT:-dfdcbab685e57677014f05a3309b48cc87383167}
ASSETS_GIT=${ASSETS_GIT:-$MIRROR/AUTOMATIC1111+stable-diffusion-webui-assets/repo}
HFGUESS_GIT=${HFGUESS_GIT:-$MIRROR/lllyasviel+huggingface_guess/repo}
BLIP_GIT=${BLIP_GIT:-$MIRROR/salesforce+BLIP/repo}
FORGE_DIR=${FORGE_DIR:-/work/host/forge}
VENV_DIR=${VENV_DIR:-/work/host/forge-venv}
if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null; then PYTHON=python3.11; else PYTHON=python3; fi
fi
REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
source "$(dirname "${BASH_SOURCE[0]}")/setup_common.sh"

# folder | git dir | commit   (from modules/launch_utils.py of Forge dfdcbab6)
REPOS=(
  "stable-diffusion-webui-assets|$ASSETS_GIT|6f7db241d2f8ba7457bac5ca9753331f0c266917"
  "huggingface_guess|$HFGUESS_GIT|84826248b49bb7ca754c73293299c4d4e23a548d"
  "BLIP|$BLIP_GIT|48211a1594f1321b00f14c9f7a5b4813144b2fb9"
)
# Paths left out of a checkout (sparse checkout): files the snapshots do not hold.
declare -A SKIP=( ["BLIP"]="/BLIP.gif" )

# Clone $1 (git dir) into $2 and check out $3, unless $2 is already at $3. $4: a path to leave out.
clone_at() {
  local src=$1 dst=$2 commit=$3 skip=${4:-}
  if [ -d "$dst/.git" ] && [ "$(git -C "$dst" rev-parse HEAD 2>/dev/null)" = "$commit" ]; then
    echo "ok   $dst @ ${commit:0:10}"; return
  fi
  if [ ! -d "$dst/.git" ]; then
    echo "clone $src -> $dst"
    git clone -q --no-checkout "$src" "$dst"
  fi
  if [ -n "$skip" ]; then
    # Written directly: `git sparse-checkout set` would try to update the (empty) work tree first.
    git -C "$dst" config core.sparseCheckout true
    printf '/*\n!%s\n' "$skip" >"$(git -C "$dst" rev-parse --absolute-git-dir)/info/sparse-checkout"
  fi
  if [ -n "$skip" ]; then
    # git still names the left-out blob it lacks while writing the index ("invalid object … for
    # 'BLIP.gif'"); the checkout is complete and clean. Hide just that line.
    git -C "$dst" -c advice.detachedHead=false checkout -q "$commit" 2>&1 | { grep -v "invalid object .* for '${skip#/}'" || true; } >&2
  else
    git -C "$dst" -c advice.detachedHead=false checkout -q "$commit"
  fi
  echo "ok   $dst @ ${commit:0:10}"
}

git -C "$FORGE_GIT" cat-file -e "$FORGE_COMMIT^{commit}" 2>/dev/null || {
  echo "error: $FORGE_GIT does not hold $FORGE_COMMIT (fetch github:lllyasviel/stable-diffusion-webui-forge)" >&2
  exit 1; }

# 1. Code
mkdir -p "$(dirname "$FORGE_DIR")"
clone_at "$FORGE_GIT" "$FORGE_DIR" "$FORGE_COMMIT"
mkdir -p "$FORGE_DIR/repositories"
for entry in "${REPOS[@]}"; do
  IFS='|' read -r name src commit <<<"$entry"
  clone_at "$src" "$FORGE_DIR/repositories/$name" "$commit" "${SKIP[$name]:-}"
done

# 2. Python environment (joblib: missing from Forge's requirements; its built-in soft-inpainting
# script imports it)
provision_venv "$VENV_DIR" "$FORGE_DIR/requirements_versions.txt" "$VENV_DIR/.lr_forge_setup_done" \
  "$FORGE_COMMIT $(sha1sum "$REPO_ROOT/requirements.txt" | cut -c1-12)" joblib

"$VENV_DIR/bin/python" -W ignore - <<'EOF'
import torch, torchvision, gradio, fastapi, transformers, scipy, segment_anything, pkg_resources, joblib, safetensors
print("ok   venv: torch", torch.__version__, "torchvision", torchvision.__version__, "gradio", gradio.__version__,
      "transformers", transformers.__version__)
EOF
echo "Forge: $FORGE_DIR @ ${FORGE_COMMIT:0:10}   python: $VENV_DIR/bin/python"
echo "Run the Forge host tests: LR_FORGE_DIR=$FORGE_DIR LR_FORGE_PYTHON=$VENV_DIR/bin/python pytest tests/host/forge"
