"""A refused img2img request computes nothing — not even the WebUI's `p.init` (issue 19).

img2img's `init` encodes the input with a draw from the global torch RNG (the VAE posterior's
sample): a refusal that let it run would change the next plain img2img with the same seed."""

from __future__ import annotations

import base64

import host_helpers as H
import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("webui")

NOT_AN_IMAGE = base64.b64encode(b"this is not an image" * 10).decode()


@pytest.mark.parametrize(
    "bad",
    [
        {"reference_image": "GOOD_THEN_BAD"},  # one bad photo in a list
        {"lambda1": 99},  # a bad value
    ],
    ids=["bad-photo-in-list", "bad-lambda1"],
)
def test_plain_img2img_is_bit_identical_after_a_refused_request(url, lr, reference_b64, bad):
    before = H.img2img(url, H.img2img_body())
    assert before.ok, before.describe()
    if bad.get("reference_image") == "GOOD_THEN_BAD":
        bad = {"reference_image": [reference_b64, NOT_AN_IMAGE]}
    refused = H.img2img(url, H.lr_img2img_body(lr(**bad)))
    assert 400 <= refused.status < 500, refused.describe()
    after = H.img2img(url, H.img2img_body())
    assert after.ok, after.describe()
    assert np.array_equal(before.image, after.image), (
        "the plain img2img changed after a refused request: the refusal ran the WebUI's p.init"
    )
