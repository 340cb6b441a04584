"""Evaluation harness: the paper's metrics (I_DINO, I_CLIP, T_CLIP, ImageReward, IS, σ²_avg) and the
ViCo protocol runner that drives the WebUI API. Imports nothing from the WebUI nor the rest of the
library except `errors`. `models` and `scoring` (transformers, torchvision) load only when used.

    python -m lib_layout_retouch.evaluation run   --vico DIR --concepts concepts.json --url URL --out DIR
    python -m lib_layout_retouch.evaluation score --out DIR [--dino PATH --clip PATH ...]
"""

from __future__ import annotations

from .diversity import centre_heatmap, mask_centre, save_heatmap_png, sigma2_avg
from .metrics import TCLIP_MODES, effective_splits, inception_score, mean_cosine, tclip_text
from .runner import (
    RunSettings,
    WebUIClient,
    build_payload,
    load_concepts,
    read_prompts,
    run_protocol,
)

__all__ = [
    "centre_heatmap",
    "mask_centre",
    "save_heatmap_png",
    "sigma2_avg",
    "TCLIP_MODES",
    "effective_splits",
    "inception_score",
    "mean_cosine",
    "tclip_text",
    "RunSettings",
    "WebUIClient",
    "build_payload",
    "load_concepts",
    "read_prompts",
    "run_protocol",
]
