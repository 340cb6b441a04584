"""The ComfyUI glue (`layout_retouch_comfy/`) asks the MODEL's family adapter
(`lib_layout_retouch.adapters.comfy.model_family`) everything that differs between SD1.x/SDXL and
Flux.1, and never which family it holds; every family adapter answers every question the glue asks,
with the signature `ModelFamily` declares. Read from the glue's source (the family words in its
tooltips and messages are text for the user, not branches)."""

import ast
import inspect
import pathlib

import pytest

from lib_layout_retouch.adapters.comfy import FAMILIES, ModelFamily
from tests import family_guard as guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE = ROOT / "layout_retouch_comfy"
# The glue's ways to the adapter: `model_family(model).<question>`, or the `family` it was given.
ASK_CALL, ASK_NAME = "model_family", "family"

# What would tell a family by name: its modules, its detection and constructors, its flags.
FAMILY_MODULES = (
    "lib_layout_retouch.adapters.comfy.flux",
    "lib_layout_retouch.adapters.comfy.sd",
    "lib_layout_retouch.dit",
    "lib_layout_retouch.unet",
)
FAMILY_NAMES = {
    "is_flux",
    "comfy_flux_model",
    "ComfyModel",
    "ComfyFluxModel",
    "COMFY_FLUX",
    "COMFY_SD",
    "FAMILIES",
    "DEFAULT_GUIDANCE",
    "stage1_layout_refusal",
    "check_blocks_free",
    "check_attention_free",
    "model_family_of",
    "FLUX_FAMILY",
    "SDXL_FAMILY",
    "SD1_FAMILY",
    "is_sd1",
    "is_sdxl",
}


def family_branches(source: str) -> list[str]:
    return guard.family_branches(source, FAMILY_MODULES, FAMILY_NAMES)


def glue_sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(GLUE.glob("*.py"))}


def questions_asked(source: str) -> set[str]:
    """The attributes read on `model_family(...)` or on a name `family`."""
    asked = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == ASK_CALL:
            asked.add(node.attr)
        elif isinstance(value, ast.Name) and value.id == ASK_NAME:
            asked.add(node.attr)
    return asked


def test_the_comfy_glue_never_tells_a_family_by_name():
    sources = glue_sources()
    assert {"run.py", "nodes.py", "inputs.py", "glue.py"} <= set(sources)
    assert {name: family_branches(s) for name, s in sources.items() if family_branches(s)} == {}


@pytest.mark.parametrize(
    "planted",
    [
        "if is_flux(model):\n    pass",
        "from lib_layout_retouch.adapters.comfy.flux import comfy_flux_model",
        "from lib_layout_retouch.adapters.comfy.sd import check_attention_free",
        "import lib_layout_retouch.dit.flux.family as f",
        "x = getattr(model.model, 'is_sdxl', False)",
        "flux = type(model.model.model_config).__name__ == 'Flux'",
        "g = DEFAULT_GUIDANCE",
    ],
)
def test_the_family_guard_sees_a_planted_branch(planted):
    assert family_branches(glue_sources()["run.py"] + "\n" + planted + "\n")


def test_every_family_adapter_answers_every_question_the_glue_asks():
    asked = set().union(*(questions_asked(s) for s in glue_sources().values()))
    declared = {n for n in vars(ModelFamily) if not n.startswith("_")} | set(
        ModelFamily.__annotations__
    )
    # the glue asks what its steps need; the protocol declares no question nobody asks but the
    # detection (`matches`, model_family's), the input checks (`check_free`, adapters.comfy's
    # check_models) and the adapter's `name`
    assert asked == declared - {"matches", "check_free", "name"}, (asked, declared)
    assert {"encoder", "continuation_noise", "model", "check_schedule"} <= asked
    for family in FAMILIES:
        for question in declared:
            assert hasattr(family, question), (family.name, question)
            want = getattr(ModelFamily, question, None)
            if callable(want):
                got = inspect.signature(getattr(family, question))
                assert list(got.parameters) == list(inspect.signature(want).parameters)[1:], (
                    family.name,
                    question,
                )
