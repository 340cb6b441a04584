"""Several subjects through the nodes' run (`layout_and_retouch` with chained Subject nodes, a layout
given: the Retouch node) over the ComfyUI stand-ins of test_comfy_model: each subject gets a region
of its own (the `regions` IMAGE in the subjects' colours), the result differs from one subject, and a
subject's LoRA (a clone with weight patches, re-patched on load as ComfyUI does) acts in its region
only, switched per model call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from layout_retouch_comfy import run
from layout_retouch_comfy import subjects as S
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.job import regions_from_image
from tests.paths import VICO, photo_tensor
from tests.test_comfy_model import Clip, comfy_of
from tests.test_comfy_run import Calls, Vae

CAT_PHOTO = VICO / "black_cat" / "00.jpg"
PROMPT = "a sks dog and a cat on the beach"


def image_of(photo) -> torch.Tensor:
    """IMAGE (1, H, W, 3) in [0, 1] of a photo tensor in [-1, 1]."""
    return ((photo + 1) / 2).movedim(1, -1)


class LoraCalls(Calls):
    """Calls with ComfyUI's LoRA: `with_lora` clones the MODEL with weight patches (here: one fixed
    change of every Linear weight, scaled by the strength); loading a patcher puts exactly its
    patches on the shared weights (ComfyUI re-patches when another clone's patches are on)."""

    def __init__(self, layers, original, everywhere=None):
        super().__init__()
        self.layers, self.original, self.everywhere = layers, original, everywhere

    def restore(self):
        with torch.no_grad():
            for m, w in zip(self.layers, self.original):
                m.weight.copy_(w)

    def with_lora(self, model, lora, strength):
        clone = model.clone()
        clone.lora = [strength * d for d in lora["deltas"]]
        return clone

    def load(self, patcher):
        super().load(patcher)
        deltas = self.everywhere or getattr(patcher, "lora", None)
        with torch.no_grad():
            for i, m in enumerate(self.layers):
                m.weight.copy_(self.original[i] + (deltas[i] if deltas else 0))


def lora_of(layers, seed=5, scale=0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "deltas": [
            scale * m.weight.std() * torch.randn(m.weight.shape, generator=g) for m in layers
        ]
    }


@pytest.fixture(scope="module")
def objects(tiny_ldm):
    return comfy_of(tiny_ldm), Clip(tiny_ldm), Vae(tiny_ldm)


def retouch(objects, subjects, calls=None, reference=None, prompt=PROMPT, model=None, **kw):
    own_model, clip, vae = objects
    model = model or own_model
    layout = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))}
    values = dict(
        prompt=prompt,
        negative_prompt="",
        concept_token="sks",
        class_phrase="dog",
        steps=8,
        cfg=7.5,
        lambda1=0,
        lambda2=2,
        mask_start=5,
        scale_with_steps=False,
        seed=0,
        sampler_name="ddim",
        scheduler="ddim_uniform",
    )
    values.update(kw)
    return run.layout_and_retouch(
        calls or Calls(),
        model=model,
        clip=clip,
        vae=vae,
        layout=layout,
        reference=reference,
        subjects=subjects,
        **values,
    )


def dog(lora=None):
    if lora is None:
        return S.Subject(image_of(photo_tensor()), "photo", "", "dog")
    return S.Subject(image_of(photo_tensor()), "lora", "sks", "dog", "dog.safetensors", lora, 1.0)


def cat():
    return S.Subject(image_of(photo_tensor(CAT_PHOTO)), "photo", "", "cat")


def region_index(out) -> np.ndarray:
    (picture,) = (out.regions * 255).round().byte().numpy()
    return regions_from_image(Image.fromarray(picture))


def test_two_subject_nodes_give_two_regions_and_another_result_than_one(objects):
    two = retouch(objects, (dog(), cat()), prompt="a dog and a cat on the beach")
    index = region_index(two)
    assert two.regions.shape == (1, 64, 64, 3)
    assert (index == 0).any() and (index == 1).any(), "each subject has a region"
    # every pixel is one subject's colour or black (no third colour: the regions are disjoint)
    (picture,) = (two.regions * 255).round().byte().numpy()
    black = (picture == 0).all(-1)
    assert ((index >= 0) | black).all()
    one = retouch(objects, (dog(),), prompt="a dog and a cat on the beach")
    assert not torch.allclose(one.retouched["samples"], two.retouched["samples"], atol=1e-3)
    # one subject: its region is where the blend mask is at least ½, in subject 1's colour
    one_index = region_index(one)
    assert np.array_equal(one_index == 0, (one.mask[0] >= 0.5).numpy())
    assert set(np.unique(one_index)) <= {-1, 0}


def test_the_nodes_own_photos_are_subject_1_and_the_chain_the_subjects_after_it(objects):
    chained = retouch(objects, (dog(), cat()), prompt="a dog and a cat on the beach")
    own = retouch(
        objects,
        (cat(),),
        reference=image_of(photo_tensor()),
        prompt="a sks dog and a cat on the beach",
    )
    # the same two regions' colours, subject 1 (the node's own, "sks dog") first
    assert set(np.unique(region_index(own))) >= {0, 1}
    assert own.info.split("\n")[0] == chained.info.split("\n")[0]


def test_a_subjects_lora_acts_in_its_own_region(objects, tiny_ldm):
    """Subject 1's LoRA changes the result outside its region far less than the same LoRA on the
    whole MODEL (what attention carries across; the library's test_subjects bound, measured here
    through the nodes' clones and loads), and more inside than outside."""
    layers = [m for m in tiny_ldm.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    original = [m.weight.detach().clone() for m in layers]
    lora = lora_of(layers)
    calls = LoraCalls(layers, original)
    try:
        # the same prompt, words and rows without the LoRA: an embedding's token (none loaded)
        same_words = S.Subject(image_of(photo_tensor()), "textual_inversion", "sks", "dog")
        plain = retouch(objects, (same_words, cat()), LoraCalls(layers, original))
        scoped = retouch(objects, (dog(lora), cat()), calls)
        everywhere = retouch(
            objects, (same_words, cat()), LoraCalls(layers, original, everywhere=lora["deltas"])
        )
    finally:
        calls.restore()  # the session's tiny model
    inside = torch.from_numpy(region_index(scoped) == 0)[::8, ::8]  # the latent cells
    assert inside.any() and (~inside).any()

    def effect(out):
        d = (out.retouched["samples"] - plain.retouched["samples"]).abs()[0].mean(0)
        return float(d[inside].mean()), float(d[~inside].mean())

    scoped_in, scoped_out = effect(scoped)
    _, everywhere_out = effect(everywhere)
    # measured: outside 0.14, inside 0.22, the whole-image LoRA's outside 1.80 (0.077 of it)
    assert scoped_out <= 0.15 * everywhere_out
    assert scoped_in >= 1.2 * scoped_out
    # the LoRA's clone and the base were loaded in turn (each step: base call, then subject 1's)
    kinds = [getattr(p, "lora", None) is not None for p in calls.loaded]
    first = kinds.index(True)
    assert False in kinds[first:] and kinds.count(True) >= 2


def test_a_subject_of_a_chain_with_a_bad_photo_batch_is_named(objects):
    bad = S.Subject(torch.rand(5, 16, 16, 3), "photo", "", "cat")
    with pytest.raises(LayoutRetouchError) as e:
        retouch(objects, (dog(), bad), prompt="a dog and a cat")
    assert str(e.value).startswith("Layout-and-Retouch: subject 2: reference has 5 photos")
