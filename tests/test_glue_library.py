"""The parts of the WebUI glue that are library code: axes, the job, subject rows in A1111's
parsed chunks, the hints file, and the host-import rules: the library imports no host and no host's
glue, ComfyUI's host-free glue modules no host (directly or through other modules)."""

import ast
import os
import py_compile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lib_layout_retouch import axes
from lib_layout_retouch import job as lr_job
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELDS, LayoutRetouchParams
from lib_layout_retouch.prompts import subject_positions_in_chunks
from tests.import_graph import Imports, imported_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A reference photo made here (these tests need any photo, not the ViCo data): 128×128, so the
# 64×64 jobs below resize it without a crop.
PHOTO = Image.fromarray(
    np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8), "RGB"
)


# The hosts: A1111's `modules`, Forge's `backend`, gradio, and ComfyUI's top-level packages.
HOSTS = ("modules", "backend", "gradio") + (
    "comfy",
    "comfy_extras",
    "comfy_execution",
    "latent_preview",
    "folder_paths",
    "node_helpers",
    "nodes",
    "server",
    "execution",
)
GLUE = ("layout_retouch_webui", "layout_retouch_comfy", "scripts")  # each host's glue
# The ComfyUI glue's modules that import ComfyUI (layout_retouch_comfy/__init__.py: `nodes` and
# `glue`; the package loads `nodes` on first use). Every other module of it is host-free: the tests
# drive them without ComfyUI.
COMFY_HOST_MODULES = (
    "layout_retouch_comfy",
    "layout_retouch_comfy.glue",
    "layout_retouch_comfy.nodes",
)


def _top(name: str) -> str:
    return name.split(".")[0]


def host_imports(source: str, module: str = "lib_layout_retouch.x") -> list[str]:
    """The names `source` (the text of `module`) imports whose top-level package is a host's or a
    host glue's."""
    return sorted(n for n in imported_names(source, module) if _top(n) in HOSTS + GLUE)


def host_violations(imports: Imports) -> list[str]:
    """The library importing a host or a host's glue, and ComfyUI's host-free glue modules importing
    a host — directly or through other project modules (`Imports.violations`)."""
    library = [m for m in imports.paths if _top(m) == "lib_layout_retouch"]
    comfy_free = [
        m
        for m in imports.paths
        if _top(m) == "layout_retouch_comfy" and m not in COMFY_HOST_MODULES
    ]
    return imports.violations(library, lambda n: _top(n) in HOSTS + GLUE) + imports.violations(
        comfy_free, lambda n: _top(n) in HOSTS
    )


def test_the_import_check_sees_every_host_and_every_import_form():
    for host in HOSTS + GLUE:
        assert host_imports(f"import {host}") == [host]
        assert host_imports(f"import os, {host}.x as y") == [f"{host}.x"]
        assert host_imports(f"def f():\n    from {host}.x import y") == [f"{host}.x.y"]
    assert (
        host_imports("import modulesx, torch\nfrom . import modules\nfrom .gradio import a") == []
    )


def test_the_library_and_comfys_host_free_modules_import_no_host():
    imports = Imports(("lib_layout_retouch", "layout_retouch_comfy"))
    assert len(imports.paths) > 30 and "lib_layout_retouch.evaluation.runner" in imports.paths
    assert {"layout_retouch_comfy.inputs", "layout_retouch_comfy.run"} <= set(imports.paths)
    assert "comfy.sample" in imports.names["layout_retouch_comfy.glue"]  # (the glue may)
    assert host_violations(imports) == []


def test_a_host_import_is_found_in_the_library_or_through_comfys_glue(tmp_path):
    files = {
        "lib_layout_retouch/__init__.py": "",
        "lib_layout_retouch/a.py": "def f():\n    import gradio as gr\n",
        "lib_layout_retouch/b.py": "from layout_retouch_comfy import inputs\n",
        "layout_retouch_comfy/__init__.py": "def f():\n    from layout_retouch_comfy import nodes\n",
        "layout_retouch_comfy/glue.py": "import comfy.sample\n",
        "layout_retouch_comfy/nodes.py": "from layout_retouch_comfy import glue, run\n",
        "layout_retouch_comfy/inputs.py": "import folder_paths\n",
        "layout_retouch_comfy/run.py": "from . import tensors\n",
        "layout_retouch_comfy/tensors.py": "from .glue import helper\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = host_violations(Imports(("lib_layout_retouch", "layout_retouch_comfy"), tmp_path))
    assert found == [
        "lib_layout_retouch.a imports gradio",
        "lib_layout_retouch.b imports layout_retouch_comfy.inputs",
        "lib_layout_retouch.b → layout_retouch_comfy.inputs imports folder_paths",
        "layout_retouch_comfy.inputs imports folder_paths",
        "layout_retouch_comfy.run → layout_retouch_comfy.tensors → layout_retouch_comfy.glue"
        " imports comfy.sample",
        "layout_retouch_comfy.tensors → layout_retouch_comfy.glue imports comfy.sample",
    ]


def glue_files() -> list[str]:
    """The WebUI glue: the script file and the `layout_retouch_webui` package."""
    pkg = os.path.join(ROOT, "layout_retouch_webui")
    files = [os.path.join(ROOT, "scripts", "layout_retouch.py")]
    for dirpath, _, names in os.walk(pkg):
        files += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py")]
    return files


def test_glue_files_compile():
    files = glue_files() + [os.path.join(ROOT, "install.py")]
    assert len(files) > 10, files  # the package is there
    for path in files:
        py_compile.compile(path, doraise=True)


def test_the_script_file_is_only_the_script_and_its_callbacks():
    """Each concern of the glue lives in its own module of `layout_retouch_webui`; the script file
    that the WebUI loads stays the Script class plus callback registration."""
    tree = ast.parse(open(glue_files()[0], encoding="utf-8").read())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert classes == ["LayoutRetouchScript"] and functions == []


def _gen_hints():
    """tools/gen_hints.py as a module (it writes the hints file and the README's parameter table)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_hints", os.path.join(ROOT, "tools", "gen_hints.py")
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_hints_file_is_generated_from_the_fields():
    gen = _gen_hints()
    with open(gen.JS_PATH, encoding="utf-8") as f:
        assert f.read() == gen.render(), "run tools/gen_hints.py"
    for field in FIELDS:
        assert field.hint in gen.render()


def test_readme_parameter_table_is_generated_from_the_fields():
    gen = _gen_hints()
    with open(gen.README_PATH, encoding="utf-8") as f:
        readme = f.read()
    assert readme == gen.render_readme(readme), (
        "the README's parameter table is stale: run tools/gen_hints.py"
    )
    table = gen.render_readme_table()
    for field in FIELDS:
        assert f"| `{field.name}` |" in table and field.hint in table
    assert (
        "Strictly between 0 and 1 (slider 0.01–0.99)." in table
    )  # ca_threshold, from its one range


def test_one_range_for_the_ca_threshold_everywhere():
    """Validation, the mask code, the slider and the README say the same: strictly inside (0, 1)."""
    from lib_layout_retouch.masks import cross_attention_mask
    from lib_layout_retouch.params import FIELD_BY_NAME

    f = FIELD_BY_NAME["ca_threshold"]
    assert f.slider_range() == (0.01, 0.99)
    for bad in (0.0, 1.0):
        with pytest.raises(LayoutRetouchError, match="between 0 and 1 \\(exclusive\\)"):
            LayoutRetouchParams(ca_threshold=bad).validate()
        with pytest.raises(LayoutRetouchError, match="between 0 and 1 \\(exclusive\\)"):
            cross_attention_mask(torch.rand(4, 4), bad)
    LayoutRetouchParams(ca_threshold=0.999).validate()
    cross_attention_mask(torch.rand(4, 4), 0.999)


def test_axes_are_the_sweepable_knobs_with_their_grid_types():
    """The X/Y/Z axes a user sees, in order: (label, field, the type the grid parses a typed value
    into, the list the glue offers). (The words of a refusal are test_schedule's business.)"""
    got = [(a.label, a.field, a.value_type, a.choices) for a in axes.AXES]
    assert got == [
        ("[L&R] Enable", "enabled", str, "bool"),
        ("[L&R] Vanilla checkpoint", "vanilla_checkpoint", str, "checkpoints"),
        ("[L&R] Lambda1", "lambda1", int, None),
        ("[L&R] Lambda2", "lambda2", int, None),
        ("[L&R] Mask start", "mask_start", int, None),
        ("[L&R] SAM model", "sam_model", str, "sam"),
        ("[L&R] CA threshold", "ca_threshold", float, None),
        ("[L&R] Layer preset", "layer_preset", str, "layer_presets"),
        ("[L&R] Subjects retouched", "subjects_retouched", int, None),
    ]


def test_axes_write_overrides_that_are_validated_like_api_values():
    p = SimpleNamespace()
    by_label = {a.label: a for a in axes.AXES}
    assert by_label["[L&R] Lambda1"].field == "lambda1"
    axes.axis_apply("lambda1")(p, 3, [3, 5])
    axes.axis_apply("enabled")(p, "True", ["True", "False"])
    params = axes.apply_overrides(LayoutRetouchParams(lambda1=5), getattr(p, axes.OVERRIDES_ATTR))
    assert params.lambda1 == 3 and params.enabled is True
    axes.set_override(p, "ca_threshold", "abc")
    with pytest.raises(LayoutRetouchError) as err:
        axes.apply_overrides(LayoutRetouchParams(), getattr(p, axes.OVERRIDES_ATTR))
    assert err.value.parameter == "ca_threshold"
    with pytest.raises(KeyError):
        axes.set_override(p, "lambda9", 1)
    assert {a.field for a in axes.AXES} == {
        "enabled",
        "lambda1",
        "lambda2",
        "mask_start",
        "ca_threshold",
        "vanilla_checkpoint",
        "sam_model",
        "layer_preset",
        "subjects_retouched",
    }


def test_the_subjects_retouched_axis_keeps_the_first_n_subjects():
    from lib_layout_retouch.params import SubjectParams

    cat, bird = SubjectParams(class_phrase="cat"), SubjectParams(class_phrase="bird")
    base = LayoutRetouchParams(concept_token="sks", class_phrase="dog", subjects=(cat, bird))
    cells = [axes.apply_overrides(base, {axes.SUBJECTS_RETOUCHED: n}) for n in (1, 2, 3)]
    assert [c.subjects for c in cells] == [(), (cat,), (cat, bird)]
    assert (
        cells[0].to_infotext(10).keys()
        == LayoutRetouchParams(concept_token="sks", class_phrase="dog").to_infotext(10).keys()
    )  # the cell records what ran: subject 1 alone
    for bad in (0, 4, "two"):
        with pytest.raises(LayoutRetouchError) as err:
            axes.check_axis_values(base, axes.SUBJECTS_RETOUCHED, [1, bad], steps=10)
        assert err.value.message.startswith(
            f"X/Y/Z plot: [L&R] Subjects retouched = {bad}: subjects retouched is {bad}, but 3 "
            "subject(s) are given: use values from 1 to 3"
        ), err.value.message


def chunk(tokens, fixes=()):
    """A1111's PromptChunk shape: BOS + 75 + EOS ids, and embedding fixes."""
    body = list(tokens) + [49407] * (75 - len(tokens))
    return SimpleNamespace(tokens=[49406] + body + [49407], fixes=list(fixes))


VOCAB = {
    "a": 1,
    "photo": 2,
    "of": 3,
    "sks": 4,
    "dog": 5,
    "red": 6,
    "vase": 7,
    "on": 8,
    "<v>": 9,
    "<my-vase>": 10,
}


def tokenize(text):
    return [VOCAB[w] for w in text.split()]


def test_subject_rows_for_tokens_and_phrases():
    c = chunk([1, 4, 5, 8, 1, 5])  # "a sks dog on a dog"
    assert subject_positions_in_chunks([c], tokenize, "sks", "dog") == [2, 3, 6]
    # second chunk rows start at 77
    assert subject_positions_in_chunks(
        [chunk([1]), chunk([6, 7])], tokenize, "<v>", "red vase"
    ) == [78, 79]


def test_subject_rows_for_a_textual_inversion_embedding():
    emb = SimpleNamespace(name="<my-vase>", vectors=3)
    c = chunk([1, 2, 3, 0, 0, 0, 8], fixes=[SimpleNamespace(offset=3, embedding=emb)])
    assert subject_positions_in_chunks([c], tokenize, "<my-vase>", "vase") == [4, 5, 6]
    with pytest.raises(LayoutRetouchError) as err:
        subject_positions_in_chunks([chunk([1, 2])], tokenize, "sks", "dog")
    assert err.value.parameter == "class_phrase"


def make_job(**kw):
    params = LayoutRetouchParams(
        enabled=True,
        reference_image=PHOTO,
        personalization="textual_inversion",
        concept_token="sks",
        class_phrase="dog",
        **kw,
    )
    return lr_job.RetouchJob(
        params,
        prompt="a sks dog on the beach",
        negative_prompt="",
        steps=20,
        width=64,
        height=64,
        guidance_scale=7.0,
    )


def test_job_prepares_prompts_schedule_reference_and_infotext():
    job = make_job()
    assert (
        job.prompts.layout == "a dog on the beach" and job.prompts.reference == "a photo of sks dog"
    )
    assert (job.schedule.lambda1, job.schedule.lambda2, job.schedule.mask_start) == (2, 4, 13)
    assert [s for s in range(1, 21) if job.uses_vanilla(s)] == [1, 2]
    assert job.reference.size == (64, 64)
    assert job.notes == ["reference was 128×128: resized to 64×64"]
    info = job.infotext()
    assert info["LR lambda1"] == "5" and "λ1=2" in info["LR steps used"]
    assert all(k.startswith("LR ") for k in info)
    restored = LayoutRetouchParams.from_infotext(info)
    assert restored["lambda1"] == 5 and restored["personalization"] == "textual_inversion"


@pytest.mark.parametrize(
    "kw,param",
    [(dict(lambda1=50, scale_with_steps=False), "lambda1"), (dict(mask_start=1), "mask_start")],
)
def test_job_refuses_bad_values_naming_them(kw, param):
    with pytest.raises(LayoutRetouchError) as err:
        make_job(**kw)
    assert err.value.parameter == param


def test_job_refuses_a_prompt_without_the_token():
    params = LayoutRetouchParams(
        enabled=True,
        reference_image=PHOTO,
        personalization="lora",
        concept_token="sks",
        class_phrase="dog",
    )
    with pytest.raises(LayoutRetouchError) as err:
        lr_job.RetouchJob(
            params,
            prompt="a dog",
            negative_prompt="",
            steps=20,
            width=64,
            height=64,
            guidance_scale=7.0,
        )
    assert err.value.parameter == "concept_token"


def test_job_retouch_on_the_tiny_model(tiny_ldm):
    from lib_layout_retouch.retouch import InversionCache
    from lib_layout_retouch.unet.model import LdmModel

    job = make_job(lambda1=1, lambda2=1, mask_start=3, scale_with_steps=False)
    job.steps = 4
    job.schedule = job.params.schedule(4)
    model = LdmModel(tiny_ldm)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = InversionCache(2)
    res = job.retouch(model, latents, subject_tokens=[2, 3], model_key="tiny", cache=cache)
    assert res.latents.shape == latents.shape and job.mask_kind == "CA only"
    again = job.retouch(model, latents, subject_tokens=[2, 3], model_key="tiny", cache=cache)
    assert again.reference_cached and torch.equal(again.latents, res.latents)
    assert job.infotext()["LR mask"] == "CA only"
    assert lr_job.mask_to_image(res.masks[0], (64, 64)).size == (64, 64)
    assert len(lr_job.tensor_to_images(model.decode(res.latents))) == 2


def test_model_kinds_that_are_not_supported_are_refused(tiny_ldm):
    from lib_layout_retouch.unet.model import check_model_supported

    check_model_supported(tiny_ldm)  # SD1-architecture ε-prediction: fine
    sd3 = SimpleNamespace(
        is_sd3=True, model=SimpleNamespace(diffusion_model=None)
    )  # A1111's SD3 says is_sd3
    with pytest.raises(LayoutRetouchError, match="SD3 models are not supported") as err:
        check_model_supported(sd3)
    assert err.value.parameter == "sd_model"
    with pytest.raises(LayoutRetouchError, match="no UNet this extension knows"):
        check_model_supported(
            SimpleNamespace()
        )  # e.g. Forge's model object: no model.diffusion_model
    tiny_ldm.parameterization = "v"
    try:
        with pytest.raises(LayoutRetouchError, match="v-prediction"):
            check_model_supported(tiny_ldm)
    finally:
        tiny_ldm.parameterization = "eps"


def test_a_batch_with_another_prompt_writes_each_note_once():
    """The glue's per-batch job (a style changed the prompt) must not share the request's notes:
    the reference's notes ("... resized/cropped ...") would be written twice into LR notes."""
    job = make_job()
    assert job.notes, "the 64x64 job resizes the 128x128 photo, which is noted"
    batch = job.for_batch("a sks dog on the beach, oil painting", "")
    assert batch.prompts.personalized.endswith("oil painting") and batch.notes is not job.notes
    batch.add_note("only in the batch")
    job.merge_notes(batch)
    notes = job.infotext()["LR notes"].split("; ")
    assert len(notes) == len(set(notes)), notes
    assert "only in the batch" in notes and all(n in notes for n in batch.notes)


def test_log_lines_keep_their_prefix_through_logging_and_are_not_doubled():
    """The glue logs through `logging`; the host tests grep the WebUI's stdout for these exact lines."""
    import io
    import logging

    from lib_layout_retouch import logs

    stream, other = io.StringIO(), io.StringIO()
    logger = logs.attach_console(other)
    logs.attach_console(stream)  # a "Reload UI" re-import attaches again: one handler, not two
    root = io.StringIO()
    root_handler = logging.StreamHandler(root)
    logging.getLogger().addHandler(root_handler)  # a WebUI that configured logging itself
    try:
        logger.info("stage 1: switched to personalized UNet at step 4")
    finally:
        logging.getLogger().removeHandler(root_handler)
        logs.attach_console()
    assert (
        stream.getvalue()
        == "[Layout-and-Retouch] stage 1: switched to personalized UNet at step 4\n"
    )
    assert other.getvalue() == "" and root.getvalue() == ""  # no second copy anywhere


def test_the_algorithm_the_code_cites_is_in_the_repository():
    doc = os.path.join(ROOT, "docs", "ALGORITHM.md")
    text = open(doc, encoding="utf-8").read()
    for heading in (
        "direction of the step index",
        "The adaptive mask M",
        "Which layers",
        "What must hold",
    ):
        assert heading in text
    for dirpath, _, files in os.walk(ROOT):
        if any(part in dirpath for part in (".venv", ".git", "node_modules")):
            continue
        for name in files:
            if name.endswith((".py", ".md")):
                outside = (
                    "shared/" + "ALGORITHM"
                )  # (spelled in two parts so this file does not match itself)
                assert outside not in open(os.path.join(dirpath, name), encoding="utf-8").read(), (
                    name
                )
