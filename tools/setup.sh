#!/usr/bin/env bash
# Set up a development environment for the library tests and benchmarks: a venv in .venv with
# torch 2.14.1 / torchvision 0.29.1 (pinned: an unpinned torch pulls several GB), the ldm code
# A1111 runs (stable-diffusion-sdkit, without its outdated pins) and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip<26"
.venv/bin/pip install -q -r requirements-dev.txt
# ldm's own package pins torch 1.x-era versions of everything; its code runs fine on these.
.venv/bin/pip install -q --no-deps stable-diffusion-sdkit==2.1.5
.venv/bin/python -c "import torch, ldm.models.diffusion.ddpm, segment_anything, scipy; print('ok: torch', torch.__version__)"
