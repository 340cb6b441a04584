#!/usr/bin/env bash
# Build a real ComfyUI host, offline, OUTSIDE this repository, for the ComfyUI host test tier
# (tests/host/comfy/). Re-runnable: every step is skipped when already done.
#
# Inputs (env vars; defaults are where the `fetch` tool puts the public snapshot):
#   COMFY_GIT     git dir of Comfy-Org/ComfyUI holding COMFY_COMMIT
#   COMFY_COMMIT  the ComfyUI commit to build (default a125cd84…, v0.3.64 of 2025-10-12)
#   COMFY_DIR     where to put ComfyUI                (default /work/host/comfy)
#   VENV_DIR      where to put its Python venv        (default /work/host/comfy-venv)
#   PYTHON        interpreter for the venv            (default python3.11, else python3)
#   REPO_ROOT     this project (linked into custom_nodes/) (default: two levels above this script)
#
# The snapshot lacks files ≥ 4 MiB: the checkout is sparse, without
# comfy/text_encoders/llama_tokenizer/tokenizer.json (only the Llama-based models read it).
#
# Usage:  bash tests/host/setup_comfy.sh
# Then:   LR_COMFY_DIR=/work/host/comfy LR_COMFY_PYTHON=/work/host/comfy-venv/bin/python \
#           flock /tmp/lr-host.lock pytest tests/host/comfy
#
# Nothing of ComfyUI is ever copied into this project.
set -euo pipefail

MIRROR=${MIRROR:-/work/.mirror}
COMFY_GIT=${COMFY_GIT:-$MIRROR/Comfy-Org+ComfyUI/repo}
COMFY_COMMIT=${COMFY_COMMIT:-a125cd84b054a57729b5eecab930ca9408719832}
COMFY_DIR=${COMFY_DIR:-/work/host/comfy}
VENV_DIR=${VENV_DIR:-/work/host/comfy-venv}
if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null; then PYTHON=python3.11; else PYTHON=python3; fi
fi
REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
SKIP=/comfy/text_encoders/llama_tokenizer/tokenizer.json

git -C "$COMFY_GIT" cat-file -e "$COMFY_COMMIT^{commit}" 2>/dev/null || {
  echo "error: $COMFY_GIT does not hold $COMFY_COMMIT (fetch github:Comfy-Org/ComfyUI)" >&2
  exit 1; }

# 1. Code
mkdir -p "$(dirname "$COMFY_DIR")"
if [ -f "$COMFY_DIR/main.py" ] && [ "$(git -C "$COMFY_DIR" rev-parse HEAD 2>/dev/null)" = "$COMFY_COMMIT" ]; then
  echo "ok   $COMFY_DIR @ ${COMFY_COMMIT:0:10}"
else
  [ -d "$COMFY_DIR/.git" ] || { echo "clone $COMFY_GIT -> $COMFY_DIR"; git clone -q --no-checkout "$COMFY_GIT" "$COMFY_DIR"; }
  # Written directly: `git sparse-checkout set` would try to update the (empty) work tree first.
  git -C "$COMFY_DIR" config core.sparseCheckout true
  printf '/*\n!%s\n' "$SKIP" >"$(git -C "$COMFY_DIR" rev-parse --absolute-git-dir)/info/sparse-checkout"
  # git names the left-out blob it lacks while writing the index; the checkout is complete. Hide it.
  git -C "$COMFY_DIR" -c advice.detachedHead=false checkout -q "$COMFY_COMMIT" 2>&1 \
    | { grep -v "invalid object .* for '${SKIP#/}'" || true; } >&2
  echo "ok   $COMFY_DIR @ ${COMFY_COMMIT:0:10}"
fi

# 2. This project as a custom node (ComfyUI imports its root __init__.py)
link="$COMFY_DIR/custom_nodes/sd-webui-layout-retouch"
if [ "$(readlink "$link" 2>/dev/null)" != "$REPO_ROOT" ]; then
  rm -f "$link"; ln -s "$REPO_ROOT" "$link"
fi
echo "ok   $link -> $REPO_ROOT"

# 3. Python environment: torch/torchvision pinned (the builds this machine serves), ComfyUI's
# requirements, `requests` (imported by app/frontend_management.py, missing from its file), this
# project's requirements, pytest and playwright (the tier's runner and its browser check).
stamp="$VENV_DIR/.lr_comfy_setup_done"
want="$COMFY_COMMIT $(sha1sum "$REPO_ROOT/requirements.txt" | cut -c1-12)"
if [ ! -x "$VENV_DIR/bin/python" ]; then
  echo "venv $VENV_DIR ($($PYTHON --version))"
  "$PYTHON" -m venv "$VENV_DIR"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "ok   venv already provisioned ($stamp)"
else
  pip=("$VENV_DIR/bin/python" -m pip install -q)
  cons=$(mktemp)
  printf 'torch==2.14.1\ntorchvision==0.29.1\n' >"$cons"
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
  "${pip[@]}" -r "$COMFY_DIR/requirements.txt" requests -c "$cons"
  "${pip[@]}" -r "$REPO_ROOT/requirements.txt" -c "$cons"
  "${pip[@]}" pytest playwright -c "$cons"
  rm -f "$cons"
  echo "$want" >"$stamp"
fi
"$VENV_DIR/bin/python" -W ignore - <<'PY'
import torch, torchvision, aiohttp, safetensors, scipy, segment_anything, requests
print("ok   venv: torch", torch.__version__, "torchvision", torchvision.__version__)
PY
echo "ComfyUI: $COMFY_DIR @ ${COMFY_COMMIT:0:10}   python: $VENV_DIR/bin/python"
echo "Run the ComfyUI host tests: LR_COMFY_DIR=$COMFY_DIR LR_COMFY_PYTHON=$VENV_DIR/bin/python flock /tmp/lr-host.lock pytest tests/host/comfy"
