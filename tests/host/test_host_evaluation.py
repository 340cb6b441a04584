"""The evaluation protocol runner against the live WebUI: 2 ViCo concepts × 2 prompts ×
2 seeds, Layout-and-Retouch on and off, then scored with tiny random-weight metric models.
The numbers are meaningless (random weights everywhere); the plumbing is what this checks."""

import csv
import json
import os
import subprocess
import sys

import pytest
import tiny_checkpoints as TC

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from tests.paths import HAS_VICO, VICO  # noqa: E402


@pytest.mark.skipif(not HAS_VICO, reason="the shared ViCo copy is not here")
def test_protocol_runner_against_the_webui(webui, tmp_path):
    concepts = {
        "defaults": {
            "personalization": "dreambooth",
            "vanilla_checkpoint": webui.title(TC.VANILLA),
            "checkpoint": webui.title(TC.PERSONAL),
            "lambda1": 2,
            "lambda2": 2,
            "mask_start": 4,
        },
        "concepts": {
            "brown_dog": {"token": "sks", "class": "dog"},
            "cat-toy": {"token": "sks", "class": "toy"},
        },
    }
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "lib_layout_retouch.evaluation",
        "run",
        "--vico",
        str(VICO),
        "--concepts",
        str(path),
        "--url",
        webui.url,
        "--out",
        str(out),
        "--n",
        "2",
        "--prompts",
        "2",
        "--steps",
        "6",
        "--width",
        "64",
        "--height",
        "64",
        "--random-models",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "results.md").read_text()
    print(table)
    assert "Layout-and-Retouch" in table and "I_DINO" in table and "RANDOM WEIGHTS" in table
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # one row per method
    # ON images keep the extension's own subject mask, so their layout diversity is measured
    masks = sorted(out.rglob("*.mask.png"))
    assert len(masks) == 8 and all(f"{os.sep}on{os.sep}" in str(m) for m in masks)
    on_row = table.split("| Layout-and-Retouch (on) |")[1].split("\n")[0]
    float(
        on_row.strip(" |").split("|")[-1]
    )  # σ²_avg is a number for ON (from the saved masks), not n/a
    pngs = [
        p
        for p in out.rglob("*.png")
        if "heatmap" not in str(p) and not p.name.endswith(".mask.png")
    ]
    assert len(pngs) >= 2 * 2 * 2 * 2  # concepts × prompts × seeds × {on, off}
    # the ON images are retouched: each differs from its OFF twin (same seed)
    import numpy as np
    from PIL import Image

    on = sorted(p for p in pngs if f"{os.sep}on{os.sep}" in str(p))
    assert len(on) == 8
    for p in on:
        twin = str(p).replace(f"{os.sep}on{os.sep}", f"{os.sep}off{os.sep}")
        a, b = (np.asarray(Image.open(x), dtype=np.float32) for x in (p, twin))
        assert np.abs(a - b).mean() > 0.1, p
    # resumable: a second run requests nothing new and keeps every file
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(
        [
            p
            for p in out.rglob("*.png")
            if "heatmap" not in str(p) and not p.name.endswith(".mask.png")
        ]
    ) == len(pngs)
