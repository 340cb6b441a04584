"""50 enabled generations in a row leave the WebUI's memory flat.

RSS of the server process (/proc/<pid>/status VmRSS) after each generation. The references rotate
through REFERENCES different images, more than the reference-inversion cache keeps (default 4), so the
cache fills and evicts all along. The first WARMUP runs fill the caches (reference inversions, the
vanilla UNet, allocator pools); after that RSS may not grow by more than RSS_BOUND_MIB in total, i.e.
a leak of about 1.5 MiB per generation fails: a UNet copy (~4 MiB for the tiny model), a kept model
reference, or accumulating hooks. Per-generation tensors of the tiny model are too small to see.
For scale: 50 plain tiny generations grow RSS by 0 MiB after warm-up; enabled ones by ~1 MiB.
"""

from __future__ import annotations

import host_helpers as H
import pytest

RUNS = 50
WARMUP = 10
RSS_BOUND_MIB = 64.0
REFERENCES = 6


def _references() -> list[str]:
    out = []
    for i in range(REFERENCES):
        img = H.reference_rgb()
        img.putpixel((2, 2), (i * 40, 255 - i * 40, 7))
        out.append(H.png_b64(img))
    return out


def assert_memory_flat(webui, generate, label: str = "") -> None:
    """RUNS enabled generations (`generate(i)` makes the i-th and returns its Result); the server's
    RSS may grow at most RSS_BOUND_MIB after the WARMUP first ones."""
    webui.rss_mib()  # skips when the PID is unknown
    rss = []
    for i in range(RUNS):
        H.assert_retouched(generate(i))
        rss.append(webui.rss_mib())
    base = rss[WARMUP - 1]
    growth = max(rss[WARMUP:]) - base
    summary = ", ".join(f"{v:.0f}" for v in rss)
    print(
        f"\n{label}RSS MiB per generation: {summary}\ngrowth after warm-up: {growth:.1f} MiB (bound {RSS_BOUND_MIB})"
    )
    assert growth <= RSS_BOUND_MIB, (
        f"RSS grew {growth:.1f} MiB after warm-up (bound {RSS_BOUND_MIB}): {summary}"
    )


@pytest.mark.slow
def test_50_enabled_generations_keep_memory_flat(webui, lr):
    refs = _references()
    # Own seed and prompt each time (as users do); references in rotation (the cache evicts).
    assert_memory_flat(
        webui,
        lambda i: H.txt2img(
            webui.url,
            H.lr_body(
                lr(reference_image=refs[i % REFERENCES]),
                prompt=f"a photo of sks dog number {i}",
                seed=1000 + i,
            ),
        ),
    )
