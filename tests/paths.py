"""Where the shared evaluation data lies: `../shared` beside the repository (CI's layout), or the
workplace's /work/shared."""
import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_CANDIDATES = [_ROOT.parent / "shared" / "data" / "vico", Path("/work/shared/data/vico")]
VICO = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
DOG_PHOTO = VICO / "brown_dog" / "00.jpg"
HAS_VICO = os.path.isdir(VICO)
