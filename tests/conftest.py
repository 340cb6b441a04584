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
    from tests.tiny_models import make_tiny_clip_folder

    return make_tiny_clip_folder(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def tiny_ldm(tiny_clip_dir):
    """The "personalized" tiny SD1-architecture model (seed 0)."""
    from tests.tiny_models import build_tiny_ldm

    return build_tiny_ldm(tiny_clip_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_vanilla_unet(tiny_clip_dir):
    """Another tiny model's UNet: DreamBooth's vanilla UNet for `tiny_ldm`."""
    from tests.tiny_models import build_tiny_ldm

    return build_tiny_ldm(tiny_clip_dir, seed=1).model.diffusion_model
