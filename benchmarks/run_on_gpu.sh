#!/usr/bin/env bash
# Run the SD1.5 benchmark on the GPU machine, which has torch/torchvision/numpy/einops/scipy but no
# package registry and none of ldm's own packages.
#
# Here, once:   bash benchmarks/make_wheelhouse.sh        (2.3 MiB of pure-Python wheels)
# Device tool:  run(command="bash benchmarks/run_on_gpu.sh", carry=["benchmarks/wheelhouse"], timeout_s=480)
#               (the wheelhouse is git-ignored, so it must be named in carry)
# Elsewhere:    bash benchmarks/run_on_gpu.sh [extra bench_retouch.py arguments]
#
# The wheels go into a --target folder put first on PYTHONPATH rather than a venv: the machine's
# python3 is itself a venv (/opt/torch/.venv), and `venv --system-site-packages` would inherit the
# base interpreter's site-packages, not that venv's torch. First on the path, pytorch_lightning 1.9.4
# shadows the machine's 2.x (ldm imports pytorch_lightning.utilities.distributed, gone in 2.x), and
# setuptools 80 brings back pkg_resources, which pytorch_lightning 1.9 imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${LR_BENCH_SITE:-/tmp/lr-bench-site}
shopt -s nullglob
wheels=(benchmarks/wheelhouse/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in benchmarks/wheelhouse: run benchmarks/make_wheelhouse.sh here and carry that folder" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
"$PY" - <<'PY'
import torch, ldm, omegaconf, pytorch_lightning as pl
print(f"torch {torch.__version__} cuda={torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''} · "
      f"pytorch_lightning {pl.__version__} · omegaconf {omegaconf.__version__} · ldm from {ldm.__path__[0]}")
PY
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

args=(--config sd15 --device cuda --dtype fp16 --profile)
"$PY" benchmarks/bench_retouch.py "${args[@]}" "$@" 2>&1 | tee "${OUT:-/tmp}/bench_log.txt"
# Flux.1 (full-size random architecture, 1024², bf16; ~24 GiB of weights): LR_BENCH_FLUX=1
if [ "${LR_BENCH_FLUX:-0}" = 1 ]; then
  "$PY" benchmarks/bench_retouch.py --config flux --device cuda --dtype bf16 --steps 28 \
    --out benchmarks/results/flux-cuda.json 2>&1 | tee "${OUT:-/tmp}/bench_flux_log.txt"
fi
# The device tool returns what lies under $OUT.
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.json benchmarks/results/*.profile.txt "$OUT"/ 2>/dev/null || true
fi
