"""Where the shared evaluation data lies: `../shared` beside the repository (CI's layout), or the
workplace's /work/shared."""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_CANDIDATES = [_ROOT.parent / "shared" / "data" / "vico", Path("/work/shared/data/vico")]
VICO = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
DOG_PHOTO = VICO / "brown_dog" / "00.jpg"
HAS_VICO = os.path.isdir(VICO)


def photo_tensor(path=DOG_PHOTO, size=64):
    """A photo as a (1, 3, size, size) tensor in [-1, 1] (Lanczos-resized, as the tests feed it)."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
