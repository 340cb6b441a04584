#!/usr/bin/env bash
# Build a real AUTOMATIC1111 stable-diffusion-webui v1.10.1 host, offline, OUTSIDE this repository,
# for the host test tier (tests/host/). Re-runnable: every step is skipped when already done.
#
# Inputs (env vars; defaults are where the `fetch` tool puts the public snapshots):
#   WEBUI_GIT     git dir of a repo holding commit 82a973c0 (v1.10.1); upstream is too big to fetch,
#                 the fork avilaops/stable-diffusion-webui holds it.
#   ASSETS_GIT SD_GIT SGM_GIT KDIFF_GIT BLIP_GIT   git dirs of the five repositories the WebUI clones
#                 into repositories/ (commits pinned in modules/launch_utils.py, copied below).
#   WEBUI_DIR     where to put the WebUI            (default /work/host/webui)
#   VENV_DIR      where to put its Python venv       (default /work/host/venv)
#   PYTHON        interpreter for the venv           (default python3; 3.10 or 3.11)
#   REPO_ROOT     this project (for requirements.txt) (default: two levels above this script)
#
# Usage:  bash tests/host/setup_webui.sh
# Then:   pytest tests/host        (see tests/host/README.md)
#
# Nothing of the WebUI is ever copied into this project.
set -euo pipefail

MIRROR=${MIRROR:-/work/.mirror}
WEBUI_GIT=${WEBUI_GIT:-$MIRROR/avilaops+stable-diffusion-webui/repo}
ASSETS_GIT=${ASSETS_GIT:-$MIRROR/AUTOMATIC1111+stable-diffusion-webui-assets/repo}
SD_GIT=${SD_GIT:-$MIRROR/Stability-AI+stablediffusion/repo}
SGM_GIT=${SGM_GIT:-$MIRROR/Stability-AI+generative-models/repo}
KDIFF_GIT=${KDIFF_GIT:-$MIRROR/crowsonkb+k-diffusion/repo}
BLIP_GIT=${BLIP_GIT:-$MIRROR/salesforce+BLIP/repo}
WEBUI_DIR=${WEBUI_DIR:-/work/host/webui}
VENV_DIR=${VENV_DIR:-/work/host/venv}
PYTHON=${PYTHON:-python3}
REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
source "$(dirname "${BASH_SOURCE[0]}")/setup_common.sh"

WEBUI_COMMIT=82a973c04367123ae98bd9abdf80d9eda9b910e2
# folder | git dir | commit   (from modules/launch_utils.py of v1.10.1)
REPOS=(
  "stable-diffusion-webui-assets|$ASSETS_GIT|6f7db241d2f8ba7457bac5ca9753331f0c266917"
  "stable-diffusion-stability-ai|$SD_GIT|cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"
  "generative-models|$SGM_GIT|45c443b316737a4ab6e40413d7794a7f5657c19f"
  "k-diffusion|$KDIFF_GIT|ab527a9a6d347f364e3d185ba6d714e22d80cb3c"
  "BLIP|$BLIP_GIT|48211a1594f1321b00f14c9f7a5b4813144b2fb9"
)

# Clone $1 (git dir) into $2 and check out $3, unless $2 is already at $3.
clone_at() {
  local src=$1 dst=$2 commit=$3
  if [ -d "$dst/.git" ] && [ "$(git -C "$dst" rev-parse HEAD 2>/dev/null)" = "$commit" ]; then
    echo "ok   $dst @ ${commit:0:10}"; return
  fi
  if [ ! -d "$dst/.git" ]; then
    echo "clone $src -> $dst"
    git clone -q --no-checkout "$src" "$dst"
  fi
  git -C "$dst" -c advice.detachedHead=false checkout -q "$commit"
  echo "ok   $dst @ ${commit:0:10}"
}

# 1. Code
mkdir -p "$(dirname "$WEBUI_DIR")"
clone_at "$WEBUI_GIT" "$WEBUI_DIR" "$WEBUI_COMMIT"
mkdir -p "$WEBUI_DIR/repositories"
for entry in "${REPOS[@]}"; do
  IFS='|' read -r name src commit <<<"$entry"
  clone_at "$src" "$WEBUI_DIR/repositories/$name" "$commit"
done

# 2. Python environment
provision_venv "$VENV_DIR" "$WEBUI_DIR/requirements_versions.txt" "$VENV_DIR/.lr_host_setup_done" \
  "$WEBUI_COMMIT $(sha1sum "$REPO_ROOT/requirements.txt" | cut -c1-12)"

"$VENV_DIR/bin/python" - <<'EOF'
import torch, torchvision, gradio, fastapi, transformers, scipy, segment_anything, pkg_resources, clip
print("ok   venv: torch", torch.__version__, "torchvision", torchvision.__version__, "gradio", gradio.__version__,
      "transformers", transformers.__version__)
EOF
echo "WebUI: $WEBUI_DIR   python: $VENV_DIR/bin/python"
echo "Run the host tests: LR_WEBUI_DIR=$WEBUI_DIR LR_WEBUI_PYTHON=$VENV_DIR/bin/python pytest tests/host"
