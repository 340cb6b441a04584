"""The paper's metric arithmetic, on embeddings and probabilities (no networks here).

Identity preservation (paper Sec. 4.1, App. B.3; DreamMatcher `evaluate.py`):
    I_DINO, I_CLIP = mean over all (reference photo m, generated image n) pairs of cos(e_r^m, e_g^n),
    per (concept, prompt); then averaged over prompts, then over concepts. The references are *all*
    photos in the concept's folder ({I_r^m}_{m=1}^M), not only the one used for the attention swap.
Prompt fidelity:
    T_CLIP = mean over generated images n of cos(CLIP_text(prompt), CLIP_image(I_g^n)), same averaging.
    Which text? The paper says "the prompt". DreamMatcher's released code passes the raw prompt-list
    line, so the CLIP text literally contains the placeholder "{}" ("a {} in the jungle").
    TCLIP_MODES offers both: "keep" (DreamMatcher's code, placeholder kept verbatim) and "class"
    (placeholder replaced by the class phrase: "a dog in the jungle"; our default, since the concept
    token means nothing to a vanilla CLIP and "{}" is not language).
ImageReward (paper App. B.3): mean score per (concept, prompt), same averaging; text as for T_CLIP.
Inception Score (Salimans et al. 2016; paper Sec. 4.3):
    IS = exp( E_x KL( p(y|x) || p(y) ) ), p(y) the mean of p(y|x) over the set, computed per split and
    averaged over splits (mean, std). Split k of K covers images [k*N//K, (k+1)*N//K): OpenAI's
    inception_score.py (Salimans et al.'s code), std over splits with ddof=0 as there. When N is not a
    multiple of K the last splits are the larger ones (N=10, K=3: 3, 3, 4 images). torchmetrics
    differs (torch.chunk: 4, 4, 2, a random shuffle, and the unbiased std), so the original code is
    the reference here. Uniform p(y|x) -> IS = 1; one-hot predictions spread evenly
    over k classes -> IS = k.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import xlogy

from ..errors import LayoutRetouchError

TCLIP_MODES = ("class", "keep")
DEFAULT_TCLIP_MODE = "class"
DEFAULT_IS_SPLITS = 10  # the usual choice (OpenAI's and torchmetrics' IS); clamped for small sets


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.double()
    return t.unsqueeze(0) if t.ndim == 1 else t


def mean_cosine(a, b) -> float:
    """Mean of the full cosine-similarity matrix between rows of `a` (M, D) and `b` (N, D).

    DreamMatcher's `(src_feats @ gen_feats.T).mean()` with both sides L2-normalised: identical
    embeddings give 1, orthogonal ones 0.
    """
    a, b = _as_tensor(a), _as_tensor(b)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).mean())


def tclip_text(template: str, class_phrase: str, mode: str = DEFAULT_TCLIP_MODE) -> str:
    """The text T_CLIP (and ImageReward) compares with: see the module docstring for the two modes."""
    if mode == "keep":
        return template
    if mode == "class":
        return " ".join(template.replace("{}", class_phrase).split())
    raise LayoutRetouchError(
        f"Unknown T_CLIP mode '{mode}'; use one of {TCLIP_MODES}.", parameter="tclip_mode"
    )


def effective_splits(n: int, splits: int = DEFAULT_IS_SPLITS) -> int:
    """At most `splits`, and at least 2 images per split (a 1-image split always scores exactly 1)."""
    if n <= 0:
        return 0
    return max(1, min(int(splits), n // 2))


def inception_score(probs, splits: int = DEFAULT_IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over splits of exp(mean_x KL(p(y|x) || p(y))).

    `probs` is (N, C), rows summing to 1. Splits are consecutive chunks in the given order (no
    shuffling: the result is deterministic), split k = rows [k*N//K, (k+1)*N//K) as in OpenAI's code;
    `splits` is clamped by `effective_splits`.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        return float("nan"), float("nan")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(
            "inception_score expects class probabilities (non-negative rows summing to 1)"
        )
    k = effective_splits(p.shape[0], splits)
    scores = []
    n = p.shape[0]
    for i in range(k):
        part = p[i * n // k : (i + 1) * n // k]
        py = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, np.broadcast_to(py, part.shape))).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none (a metric that could not be computed)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def fmt(value: float, digits: int = 3) -> str:
    """Table formatting: 'n/a' for a metric that was not computed."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"
