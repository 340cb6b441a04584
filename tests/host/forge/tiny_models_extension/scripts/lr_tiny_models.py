"""Test-only Forge extension: registers the tier's tiny Flux/SDXL models (see ../tiny_registration.py).
Forge loads a checkpoint at the first generation, after the extensions' scripts are imported."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_registration  # noqa: E402

if tiny_registration.install():
    print(f"[lr-test tiny models] registered (configs in ${tiny_registration.ENV})")
