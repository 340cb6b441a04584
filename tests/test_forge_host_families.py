"""The Forge host (`layout_retouch_webui/hosts/forge.py`) asks the loaded engine's family adapter
(`lib_layout_retouch.adapters.forge.engine_family`) everything that differs between SD1.x/SDXL and
Flux.1, and never which family it holds; every family adapter answers every question it asks, with the
signature `EngineFamily` declares. Read from the host's source (it imports Forge, so it is not run
here; the Forge tier runs it)."""

import ast
import inspect
import pathlib

import pytest

from lib_layout_retouch.adapters.forge import FAMILIES, EngineFamily
from tests import family_guard as guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST = ROOT / "layout_retouch_webui" / "hosts" / "forge.py"
ASK = "family_adapter"  # the host's one way to the adapter: `self.family_adapter(p).<question>`

# What would tell a family by name: its modules, its detection and constructors, its flags.
FAMILY_MODULES = (
    "lib_layout_retouch.adapters.forge.flux",
    "lib_layout_retouch.adapters.forge.sd",
    "lib_layout_retouch.dit",
    "lib_layout_retouch.unet",
)
FAMILY_NAMES = {
    "is_forge_flux",
    "forge_flux_model",
    "ForgeModel",
    "FORGE_FLUX",
    "FORGE_SD",
    "FAMILIES",
    "DEFAULT_GUIDANCE",
    "stage1_layout_refusal",
    "is_sd1",
    "is_sdxl",
}


def family_branches(source: str) -> list[str]:
    """Where `source` tells a family by name (tests/family_guard.py)."""
    return guard.family_branches(source, FAMILY_MODULES, FAMILY_NAMES)


def questions_asked(source: str) -> set[str]:
    """The attributes read on `self.family_adapter(...)`."""
    return {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == ASK
    }


def host_source() -> str:
    return HOST.read_text(encoding="utf-8")


def test_the_forge_host_never_tells_a_family_by_name():
    assert family_branches(host_source()) == []


@pytest.mark.parametrize(
    "planted",
    [
        "if is_forge_flux(p.sd_model):\n    pass",
        "from lib_layout_retouch.adapters.forge.flux import forge_flux_model",
        "import lib_layout_retouch.dit.flux.family as f",
        "x = getattr(engine, 'is_sdxl', False)",
        "flux = type(p.sd_model).__name__ == 'Flux'",
    ],
)
def test_the_family_guard_sees_a_planted_branch(planted):
    assert family_branches(host_source() + "\n" + planted + "\n")


def test_every_family_adapter_answers_every_question_the_host_asks():
    asked = questions_asked(host_source())
    declared = {n for n in vars(EngineFamily) if not n.startswith("_")} | set(
        EngineFamily.__annotations__
    )
    # the host asks what its methods need; the protocol declares no question nobody asks but the
    # detection (`matches`, engine_family's) and the adapter's `name`
    assert asked == declared - {"matches", "name"}, (asked, declared)
    assert {"check", "check_params", "model", "stage1_latent", "text_encoder_slots"} <= asked
    for family in FAMILIES:
        for question in declared:
            assert hasattr(family, question), (family.name, question)
            want = getattr(EngineFamily, question, None)
            if callable(want):
                got = inspect.signature(getattr(family, question))
                assert list(got.parameters) == list(inspect.signature(want).parameters)[1:], (
                    family.name,
                    question,
                )
