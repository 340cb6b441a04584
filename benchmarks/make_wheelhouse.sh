#!/usr/bin/env bash
# Download/build into benchmarks/wheelhouse/ the wheels the GPU machine lacks for the benchmark.
#
# The GPU machine (Python 3.12, torch, torchvision, numpy, einops, pillow, tqdm, pyyaml, scipy,
# torchmetrics, lightning-utilities, pytorch-lightning 2.x) has no package registry. The benchmark
# builds ldm's LatentDiffusion with an unconditional cond stage, so it needs only:
#   stable-diffusion-sdkit  the `ldm` package A1111 runs (--no-deps: its own pins pull torch)
#   omegaconf + antlr4      ldm.util.instantiate_from_config configs
#   pytorch_lightning 1.9.4 ldm.models.diffusion.ddpm imports pl.LightningModule and
#                           pytorch_lightning.utilities.distributed (gone in 2.x)
#   setuptools < 81         pytorch_lightning 1.9 / lightning_fabric import pkg_resources
# Not needed: open_clip, transformers' CLIP (no text encoder is built: random conditioning), SAM.
# All pure-Python, well under 64 MiB (the device tool's carry limit); no torch wheels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
OUT=wheelhouse
rm -rf "$OUT"
mkdir -p "$OUT"
TARGET_PY=${TARGET_PY:-3.12}   # the GPU machine's Python
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$OUT" \
    stable-diffusion-sdkit==2.1.5 omegaconf==2.2.3 pytorch_lightning==1.9.4 "setuptools==80.9.0"
# antlr4-python3-runtime 4.9.3 (the version omegaconf 2.2 pins) is published as an sdist only.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" antlr4-python3-runtime==4.9.3 \
  || "$PY" -m pip wheel -q --no-deps -w "$OUT" antlr4-python3-runtime==4.9.3
ls -l "$OUT"
du -sh "$OUT"
total=$(du -sk "$OUT" | cut -f1)
if [ "$total" -gt $((60 * 1024)) ]; then
  echo "wheelhouse is ${total} KiB: over the 60 MiB budget (the device tool carries 64 MiB in all)" >&2
  exit 1
fi
