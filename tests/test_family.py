"""The retouch loop and stage 1 reach the model only through its family (the contract of
retouch/family.py): a family that wraps the ε-UNet one sees every call, and the result is bit for
bit the default's; the family-free modules import no family's folder."""

import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch import family
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet.family import SD1, EpsUNetFamily
from lib_layout_retouch.unet.model import LdmModel
from tests.import_graph import Imports
from tests.paths import photo_tensor

T = 6


class CountingSampler:
    def __init__(self, inner, seen):
        self.inner, self.seen, self.steps = inner, seen, inner.steps

    def __getattr__(self, name):  # time_of_step, level_before_step, predict, guide, step, invert
        self.seen.append(name)
        return getattr(self.inner, name)


class CountingFamily(EpsUNetFamily):
    """SD1's family, recording every contract method the loop or stage 1 calls."""

    def __init__(self):
        super().__init__("SD1.x", sdxl=False)
        self.seen = []

    def __getattribute__(self, name):
        if name in CONTRACT:
            object.__getattribute__(self, "seen").append(name)
        return object.__getattribute__(self, name)

    def sampler(self, model, steps, latent_hw=None):
        return CountingSampler(super().sampler(model, steps, latent_hw), self.seen)


CONTRACT = (
    "sampler",
    "halves",
    "encode_conds",
    "conditioning",
    "subject_tokens",
    "vanilla",
    "layer_table",
    "editor",
    "patched",
)


def _retouch(model, setup):
    _, conds, subject, ref, layouts = setup
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=4, scale=False)
    )
    return pl.retouch(
        model,
        reference_latent=ref,
        layout_latents=layouts,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
    )


def test_a_model_family_supplies_sampler_layers_editor_and_patch(setup, tiny_ldm):
    plain = LdmModel(tiny_ldm)
    assert family.family_of(plain) is SD1
    default = _retouch(plain, setup)
    wrapped = LdmModel(tiny_ldm)
    wrapped.family = CountingFamily()
    res = _retouch(wrapped, setup)
    seen = wrapped.family.seen
    assert seen[:4] == ["sampler", "layer_table", "editor", "halves"]
    # the two inversions (reference, layout) before the attention is patched, the steps inside
    last_invert = len(seen) - 1 - seen[::-1].index("invert")
    assert last_invert < seen.index("patched") < seen.index("time_of_step")
    for name in ("patched", "invert", "predict", "guide", "step", "time_of_step"):
        assert name in seen, name
    # one inversion per reference and layout, T retouch steps: predict/step go through the family
    assert seen.count("invert") == 2 and seen.count("time_of_step") == T
    assert torch.equal(res.latents, default.latents)
    assert torch.equal(res.masks, default.masks)


def test_both_stages_ask_the_family_for_conditionings_subject_rows_and_the_vanilla_model(
    tiny_ldm, tiny_vanilla_unet
):
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(4, lambda1=1, lambda2=2, mask_start=3, scale=False)
    )
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def generate(model):
        return pl.generate(
            model,
            prompts=prompts,
            reference_image=photo_tensor(),
            noise=noise,
            settings=settings,
            vanilla_unet=tiny_vanilla_unet,
        )

    default = generate(LdmModel(tiny_ldm))
    wrapped = LdmModel(tiny_ldm)
    wrapped.family = CountingFamily()
    out = generate(wrapped)
    seen = wrapped.family.seen
    for name in CONTRACT:
        assert name in seen, name
    # stage 1 (its sampler, halves and vanilla context) before the retouch's layer table
    assert seen.index("vanilla") < seen.index("layer_table")
    assert torch.equal(out.images, default.images)


FAMILY_FOLDERS = (
    "lib_layout_retouch.unet",
    "lib_layout_retouch.dit",
    "lib_layout_retouch.adapters",
)
# The retouch package, stage 1 and the paper's family-free modules.
FAMILY_FREE = tuple(
    f"lib_layout_retouch.{m}" for m in ("stage1", "schedule", "prompts", "masks", "conditioning")
)


def family_violations(imports: Imports) -> list[str]:
    """What the family-free modules import from a family folder, directly or through other
    modules of the library."""
    free = [
        m for m in imports.paths if m.startswith("lib_layout_retouch.retouch") or m in FAMILY_FREE
    ]
    return imports.violations(free, lambda name: name.startswith(FAMILY_FOLDERS))


def test_the_loop_stage1_and_the_paper_modules_import_no_family():
    """The retouch package, stage 1 and the paper's family-free modules ask no family by name: they
    import nothing from unet/, dit/ or adapters/ (a family is one folder behind the contract), also
    not through another module."""
    imports = Imports(("lib_layout_retouch",))
    assert {"lib_layout_retouch.retouch.loop", "lib_layout_retouch.stage1"} <= set(imports.paths)
    assert family_violations(imports) == []


def test_the_family_guard_sees_an_import_of_a_family(tmp_path):
    files = {
        "retouch/__init__.py": "",
        "retouch/planted.py": "from ..unet.ddim import DDIMSampler\n",
        "masks.py": "def f():\n    from . import helper\n",
        "helper.py": "import lib_layout_retouch.dit.flux.model\n",
    }
    for rel, text in files.items():
        path = tmp_path / "lib_layout_retouch" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert family_violations(Imports(("lib_layout_retouch",), tmp_path)) == [
        "lib_layout_retouch.masks → lib_layout_retouch.helper imports lib_layout_retouch.dit.flux.model",
        "lib_layout_retouch.retouch.planted imports lib_layout_retouch.unet.ddim.DDIMSampler",
    ]
