import os
import sys

# No model hub here or in CI: everything is built locally with random weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from tests.fixtures.sd1 import make_tiny_clip_folder

    return make_tiny_clip_folder(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def tiny_ldm(tiny_clip_dir):
    """The "personalized" tiny SD1-architecture model (seed 0)."""
    from tests.fixtures.sd1 import build_tiny_ldm

    return build_tiny_ldm(tiny_clip_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_vanilla_unet(tiny_clip_dir):
    """Another tiny model's UNet: DreamBooth's vanilla UNet for `tiny_ldm`."""
    from tests.fixtures.sd1 import build_tiny_ldm

    return build_tiny_ldm(tiny_clip_dir, seed=1).model.diffusion_model


@pytest.fixture(scope="module")
def setup(tiny_ldm):
    """The tiny SD1 model, its retouch conditionings for "a sks dog on the beach", the subject
    tokens, the dog photo's latent and two random 8×8 layouts (test_pipeline, test_img2img; the
    retouch on it: tests/sd1_retouch.py)."""
    import torch

    from lib_layout_retouch import retouch as pl
    from lib_layout_retouch.prompts import derive_prompts, subject_token_positions
    from lib_layout_retouch.unet.model import LdmModel
    from tests.paths import photo_tensor

    model = LdmModel(tiny_ldm)
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    subject = subject_token_positions(model.tokenize, prompts.personalized, ["sks", "dog"])
    ref = model.encode(photo_tensor())
    g = torch.Generator().manual_seed(7)
    layouts = torch.randn(2, 4, 8, 8, generator=g)
    return model, conds, subject, ref, layouts
