"""50 enabled generations in a row leave the WebUI's memory flat (issue 3 "Tests").

RSS of the server process (/proc/<pid>/status VmRSS) after each generation. The first WARMUP runs
fill the caches (reference inversion, vanilla UNet, allocator pools); after that RSS may not grow by
more than RSS_BOUND_MIB in total. With tiny models every cache entry is well under a MiB, so a leak of
even one layout image or latent history per generation crosses the bound. For scale: 50 plain tiny
generations on this host grow RSS by 0 MiB after warm-up.
"""
from __future__ import annotations

import pytest

import host_helpers as H

RUNS = 50
WARMUP = 10
RSS_BOUND_MIB = 64.0


@pytest.mark.slow
def test_50_enabled_generations_keep_memory_flat(webui, lr):
    webui.rss_mib()  # skips when the PID is unknown
    rss = []
    for i in range(RUNS):
        # Own seed and prompt each time (as users do); the same reference (a cache hit after the first).
        r = H.txt2img(webui.url, H.lr_body(lr(), prompt=f"a photo of sks dog number {i}", seed=1000 + i))
        H.assert_retouched(r)
        rss.append(webui.rss_mib())
    base = rss[WARMUP - 1]
    growth = max(rss[WARMUP:]) - base
    summary = ", ".join(f"{v:.0f}" for v in rss)
    print(f"\nRSS MiB per generation: {summary}\ngrowth after warm-up: {growth:.1f} MiB (bound {RSS_BOUND_MIB})")
    assert growth <= RSS_BOUND_MIB, f"RSS grew {growth:.1f} MiB after warm-up (bound {RSS_BOUND_MIB}): {summary}"
