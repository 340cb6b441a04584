"""The retouch loop and stage 1 reach the model only through its family (the contract of
retouch/family.py): a family that wraps the ε-UNet one sees every call, and the result is bit for
bit the default's; the family-free modules import no family's folder."""

import ast
import pathlib

import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch import family
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet.family import SD1, EpsUNetFamily
from lib_layout_retouch.unet.model import LdmModel
from tests.paths import photo_tensor

ROOT = pathlib.Path(__file__).resolve().parent.parent

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


def _project_imports(path: pathlib.Path) -> set[str]:
    """The lib_layout_retouch modules `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" for a in node.names)
            found.add(base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("lib_layout_retouch")}


FAMILY_FOLDERS = (
    "lib_layout_retouch.unet",
    "lib_layout_retouch.dit",
    "lib_layout_retouch.adapters",
)


def test_the_loop_stage1_and_the_paper_modules_import_no_family():
    """The retouch package, stage 1 and the paper's family-free modules ask no family by name: they
    import nothing from unet/, dit/ or adapters/ (a family is one folder behind the contract)."""
    lib = ROOT / "lib_layout_retouch"
    free = sorted((lib / "retouch").glob("*.py")) + [
        lib / f"{m}.py" for m in ("stage1", "schedule", "prompts", "masks", "conditioning")
    ]
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in _project_imports(p) if m.startswith(FAMILY_FOLDERS)
        )
        for p in free
    }
    offenders = {p: m for p, m in offenders.items() if m}
    assert not offenders, offenders


def test_the_family_guard_sees_an_import_of_a_family(tmp_path):
    planted = tmp_path / "lib_layout_retouch" / "retouch" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("from ..unet.ddim import DDIMSampler\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert "lib_layout_retouch.unet.ddim" in _project_imports(planted)
    finally:
        ROOT = saved
