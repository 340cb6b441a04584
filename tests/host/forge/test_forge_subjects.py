"""Several subjects in Forge (SD1.5): two LoRA subjects, each LoRA merged only for its own
subject's region in the retouch (the patcher's `lora_loader` re-merges a subset) and nothing left
merged after the run. The second LoRA is written into this session's LoRA folder (Forge finds a
tag's file when it is first named), so the cached model set is not rebuilt."""

from __future__ import annotations

import os

import forge_checkpoints as FC
import host_helpers as H
import numpy as np
import pytest
from PIL import Image

LORA_2 = "forge-lora-two"
TWO_LORAS = f"a photo of sks dog and zwx cat on a sofa <lora:{FC.LORA}:1> <lora:{LORA_2}:1>"


@pytest.fixture(scope="module")
def second_lora(webui):
    lora_dir, ckpt_dir = webui.models.get("lora_dir"), webui.models.get("ckpt_dir")
    base = os.path.join(ckpt_dir or "", FC.PERSONAL + ".safetensors")
    if not (lora_dir and os.path.isfile(base)):
        pytest.skip("an attached Forge: its LoRA folder is unknown (start one with LR_FORGE_DIR)")
    return FC.write_lora(lora_dir, base, LORA_2, seed=12)


def _two_loras(lr, second_lora_name: str = "") -> dict:
    photo = 255 - np.asarray(H.reference_rgb())[:, ::-1]
    return lr(
        personalization="lora",
        vanilla_checkpoint="",
        concept_token="sks",
        class_phrase="dog",
        reference_prompt="",
        subjects=[
            dict(
                reference_image=H.png_b64(Image.fromarray(np.ascontiguousarray(photo))),
                personalization="lora",
                concept_token="zwx",
                class_phrase="cat",
                lora=second_lora_name,
            )
        ],
    )


def test_forge_two_lora_subjects_each_lora_in_its_own_region(webui, lr, second_lora):
    plain = H.txt2img(webui.url, H.plain_body(TWO_LORAS))
    assert plain.ok, plain.describe()
    a = H.txt2img(webui.url, H.lr_body(_two_loras(lr), TWO_LORAS))
    assert H.assert_retouched(a)["LR subject 2 personalization"] == "lora"
    b = H.txt2img(webui.url, H.lr_body(_two_loras(lr, FC.LORA), TWO_LORAS))
    assert H.assert_retouched(b)["LR subject 2 LoRA"] == FC.LORA
    assert H.differs(a.images[0], b.images[0]), (
        "swapping the subjects' LoRAs changed nothing: each LoRA is not scoped to its subject"
    )
    again = H.txt2img(webui.url, H.plain_body(TWO_LORAS))
    assert np.array_equal(again.image, plain.image), "a LoRA was left merged after the run"
