"""The retouch as the nodes run it (`layout_and_retouch` with a layout given: the Retouch node), over
the ComfyUI stand-ins of test_comfy_model and a tiny random SAM: the info text, the SAM+CA mask when
a SAM model is connected, and the subject mask that bounds the retouch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from layout_retouch_comfy import run
from lib_layout_retouch import segmentation
from lib_layout_retouch.errors import LayoutRetouchError
from tests.fixtures.sam import build_tiny_sam
from tests.test_comfy_model import Clip, comfy_of
from tests.tolerance import assert_rounding_close


class Vae:
    """ComfyUI's VAE: pixels (B, H, W, 3) in [0, 1] ↔ raw latents (the tiny ldm's first stage)."""

    def __init__(self, ldm):
        self.ldm = ldm

    @torch.no_grad()
    def encode(self, pixels):
        posterior = self.ldm.encode_first_stage(pixels.movedim(-1, 1) * 2 - 1)
        return posterior.mode()

    @torch.no_grad()
    def decode(self, raw):
        return ((self.ldm.decode_first_stage(raw) + 1) / 2).clamp(0, 1).movedim(1, -1)


class Calls:
    """What the retouch of a given layout asks of ComfyUI (no sampler: no stage 1)."""

    def __init__(self):
        self.loaded = []

    def load(self, patcher):
        self.loaded.append(patcher)

    def progress_bar(self, total):
        return SimpleNamespace(update_absolute=lambda *a: None)

    def previewer(self, model):
        return None

    def interrupted(self):
        return False

    def interrupt_exception(self):
        return RuntimeError("interrupted")


@pytest.fixture(scope="module")
def comfy_objects(tiny_ldm):
    return comfy_of(tiny_ldm), Clip(tiny_ldm), Vae(tiny_ldm)


@pytest.fixture(scope="module")
def segmenter():
    return segmentation.SubjectSegmenter(build_tiny_sam(seed=0))


def retouch(comfy_objects, **kw):
    model, clip, vae = comfy_objects
    g = torch.Generator().manual_seed(3)
    layout = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    reference = torch.rand(1, 80, 96, 3, generator=g)
    values = dict(
        prompt="a sks dog on the beach",
        negative_prompt="",
        concept_token="sks",
        class_phrase="dog",
        steps=6,
        cfg=5.0,
        lambda1=0,
        lambda2=2,
        mask_start=4,
        scale_with_steps=False,
        seed=0,
        sampler_name="ddim",
        scheduler="ddim_uniform",
    )
    values.update(kw)
    out = run.layout_and_retouch(
        Calls(), model=model, clip=clip, vae=vae, layout=layout, reference=reference, **values
    )
    return out, layout["samples"]


def test_info_says_the_values_used_the_mask_kind_and_the_notes(comfy_objects):
    out, _ = retouch(comfy_objects)
    lines = out.info.split("\n")
    assert lines[0] == "At 6 steps: λ2=2, mask from step 4 of 6"  # no stage 1: no λ1
    assert lines[1] == "Mask: CA only"
    assert lines[2].startswith("Notes: ") and "resized" in lines[2]  # 96×80 photo for 64×64
    assert out.as_tuple()[4] == out.info


def test_a_sam_model_makes_the_mask_sam_and_ca(comfy_objects, segmenter):
    plain, _ = retouch(comfy_objects)
    out, _ = retouch(comfy_objects, sam=segmenter)
    assert "Mask: SAM+CA" in out.info.split("\n")
    assert out.mask.shape == plain.mask.shape == (1, 64, 64)
    assert torch.isfinite(out.retouched["samples"]).all()


def test_the_subject_mask_bounds_the_retouch(comfy_objects):
    subject = torch.zeros(64, 64)
    subject[:, :32] = 1  # the left half of the image
    out, layout = retouch(comfy_objects, subject_mask=subject)
    assert "Mask: CA only in user mask" in out.info.split("\n") or "Mask: user mask" in out.info
    right = (slice(None), slice(None), slice(None), slice(4, None))  # latent columns 4–7: mask 0
    # the layout's own latents there: into the model's scale and back (× and ÷ the VAE factor)
    assert_rounding_close(out.retouched["samples"][right], layout[right], roundings=2)
    assert out.mask[..., 32:].max() == 0
    left = (slice(None), slice(None), slice(None), slice(0, 4))
    assert not torch.allclose(out.retouched["samples"][left], layout[left], atol=1e-3)


def test_a_subject_mask_of_another_batch_is_refused_naming_it(comfy_objects):
    with pytest.raises(LayoutRetouchError) as e:
        retouch(comfy_objects, subject_mask=torch.ones(3, 64, 64))
    assert "subject_mask has shape (3, 64, 64)" in str(e.value) and "'subject_mask'" in str(e.value)
