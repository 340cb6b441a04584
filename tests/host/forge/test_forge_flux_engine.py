"""The library's Forge Flux adapter (`lib_layout_retouch.adapters.forge.flux`) against Forge itself, in a
Forge Python process (no server): flux_engine_probe.py loads the tiny Flux with Forge's own loader and
checks velocity = (x − apply_model)/σ, the σ list = Forge's "Simple" scheduler, the conditioning =
the engine's, and a full retouch on Forge's transformer (target ≠ layout, nothing left patched).
"""

from __future__ import annotations

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def test_forge_flux_adapter_matches_forge_and_retouches_on_its_transformer(forge_process):
    forge_dir, python, models = forge_process
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [python, os.path.join(HERE, "flux_engine_probe.py"), forge_dir, models["root"], REPO_ROOT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print("\nForge Flux adapter:", got)
    assert got["velocity_max_err"] <= 1e-5 * got["velocity_scale"], got
    assert got["sigmas"][0] == 1.0 and got["sigmas"][-1] == 0.0 and len(got["sigmas"]) == 9, got
    assert got["copy_phase_diff"] == 0.0 and got["target_vs_layout_final"] > 0, got
    assert got["decoded"] == [1, 3, 64, 64], got
