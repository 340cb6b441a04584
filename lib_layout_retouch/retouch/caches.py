"""The two reference caches across generations: the reference inversions (an LRU of latents per
photo, model and T) and the reference path's self-attention K/V (opt-in, by bytes)."""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Optional

import torch

from .. import conditioning as C
from ..schedule import PAPER_LAMBDA2, PAPER_STEPS

# What the two reference caches cost, at SD1 512² (64×64 latents) and the paper's T and λ2 — the
# one home of these figures (the WebUI settings' labels quote them):
INVERSION_CACHE_ENTRIES = 4  # reference inversions kept by default
# one inversion: (T+1) latents of 4×64×64 fp32 floats ≈ 3.3 MB
INVERSION_ENTRY_MB = (PAPER_STEPS + 1) * 4 * 64 * 64 * 4 / 1e6
# one step of the reference's K and V (fp16, both CFG halves) at the standard preset's layers
# (output_blocks 6–11: 3 × 32² tokens × 640 + 3 × 64² tokens × 320): ≈ 47 MB; the steps s > λ2
# need them: ≈ 1.9 GB for one reference
KV_STEP_MB = 2 * 2 * 2 * 3 * (32 * 32 * 640 + 64 * 64 * 320) / 1e6
KV_REFERENCE_MB = KV_STEP_MB * (PAPER_STEPS - PAPER_LAMBDA2)


class InversionCache:
    """Bounded LRU of reference inversions, key (reference fingerprint, model key, steps).

    One entry is (T+1) latents of one image (INVERSION_ENTRY_MB at SD1 512², T = 50)."""

    def __init__(self, max_entries: int = INVERSION_CACHE_ENTRIES):
        self.max_entries = max_entries
        self._items: "collections.OrderedDict[tuple, list[torch.Tensor]]" = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Optional[list[torch.Tensor]]:
        with self._lock:
            levels = self._items.get(key)
            if levels is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return levels

    def peek(self, key: tuple) -> Optional[list[torch.Tensor]]:
        """Look without counting a hit or refreshing the entry."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple, levels: list[torch.Tensor]) -> None:
        with self._lock:
            self._items[key] = levels
            self._items.move_to_end(key)
            while len(self._items) > max(0, self.max_entries):
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class ReferenceAttentionCache:
    """Bounded LRU of the reference path's self-attention K/V at the reference layers, per step,
    so a later generation with the same reference, model, steps, size and prompts runs no
    reference rows at all. Size is the point: one reference costs KV_STEP_MB per step and
    KV_REFERENCE_MB in all (≈1.9 GB at SD1 512², T = 50, λ2 = 10), on the device — so it is
    opt-in (`max_bytes` 0 = off)."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self._items: "collections.OrderedDict[tuple, dict[int, dict]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _bytes(step_sources: dict) -> int:
        return sum(
            t.numel() * t.element_size() for v in step_sources.values() for t in v if t is not None
        )

    def nbytes(self) -> int:
        return sum(self._bytes(src) for steps in self._items.values() for src in steps.values())

    def get(self, key: tuple, s: int) -> Optional[dict]:
        with self._lock:
            steps = self._items.get(key)
            if steps is None or s not in steps:
                return None
            self._items.move_to_end(key)
            return steps[s]

    def put(self, key: tuple, s: int, sources: dict) -> None:
        if self.max_bytes <= 0 or self._bytes(sources) > self.max_bytes:
            return
        with self._lock:
            self._items.setdefault(key, {})[s] = sources
            self._items.move_to_end(key)
            while self.nbytes() > self.max_bytes and len(self._items) > 1:
                self._items.popitem(last=False)
            steps = self._items.get(key, {})
            while (
                self.nbytes() > self.max_bytes and steps
            ):  # one entry alone too big: keep what fits
                steps.pop(max(steps))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def digest(*conds: C.Cond) -> str:
    """A short hash of conditionings' values (part of the reference K/V cache's key)."""
    h = hashlib.sha1()
    for c in conds:
        for t in (c[k] for k in sorted(c)) if C.is_dict(c) else (c,):
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def inversion_key(reference_key: tuple, steps: int, latent_hw) -> tuple:
    return (*reference_key, steps, tuple(latent_hw))
