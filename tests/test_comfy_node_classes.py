"""The node classes as ComfyUI reads them, without ComfyUI (`comfy_stubs`): what VALIDATE_INPUTS
refuses before the run (and that ComfyUI passes it every input it reads), the declarations (the
reference or a chain of Subject nodes, what layout_source offers, descriptions without docstring indentation), the
SAM loader, and that a refusal's traceback stays out of ComfyUI's log."""

from __future__ import annotations

import inspect
import logging
import traceback

import pytest
import torch

from layout_retouch_comfy import texts
from lib_layout_retouch.errors import LayoutRetouchError
from tests import comfy_stubs

# The widget values of the shipped workflows (and of ComfyUI's defaults where they differ)
GOOD = dict(
    reference=None,  # connected: ComfyUI passes None for a linked input
    prompt="a photo of sks dog on a beach",
    concept_token="sks",
    class_phrase="dog",
    steps=50,
    lambda1=5,
    lambda2=10,
    mask_start=31,
    scale_with_steps=True,
)
KNOBS = {
    "LayoutRetouchSampler": ("lambda1", "lambda2", "mask_start"),
    "LayoutRetouchLayout": ("lambda1",),
    "LayoutRetouchRetouch": ("lambda2", "mask_start"),
}


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    """layout_retouch_comfy.nodes with ComfyUI's modules stubbed (models_dir: tmp_path/models)."""
    yield from comfy_stubs.stubbed_nodes(monkeypatch, tmp_path)


def validate(node_class, **values):
    """VALIDATE_INPUTS as ComfyUI calls it: only the arguments it names, of the inputs given."""
    names = inspect.getfullargspec(node_class.VALIDATE_INPUTS).args
    return node_class.VALIDATE_INPUTS(**{k: v for k, v in values.items() if k in names})


def values_for(node: str, **change):
    v = {k: x for k, x in GOOD.items() if k not in ("lambda1", "lambda2", "mask_start")}
    v.update({k: GOOD[k] for k in KNOBS[node]})
    v.update(change)
    return v


@pytest.mark.parametrize("node", list(KNOBS))
def test_validate_inputs_reads_only_inputs_the_node_has(nodes, node):
    """ComfyUI passes VALIDATE_INPUTS the inputs its arguments name: a name the node lacks would
    never be checked."""
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    spec = cls.INPUT_TYPES()
    declared = set(spec["required"]) | set(spec.get("optional", {}))
    args = inspect.getfullargspec(cls.VALIDATE_INPUTS).args[1:]
    assert args and set(args) <= declared, set(args) - declared
    assert set(KNOBS[node]) <= set(args)


@pytest.mark.parametrize("node", list(KNOBS))
def test_the_examples_values_pass_and_fed_inputs_are_not_checked(nodes, node):
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    assert validate(cls, **values_for(node)) is True
    # at 4 steps the paper's 5 / 10 / 31 scale to values that fit
    assert validate(cls, **values_for(node, steps=4)) is True
    # an input fed by another node is None before the run: nothing to check
    fed = {k: None for k in ("prompt", "concept_token", "steps", *KNOBS[node])}
    assert validate(cls, **values_for(node, **fed)) is True


BAD = [
    ("empty concept token", dict(concept_token="  "), "concept_token", "concept_token is empty"),
    ("empty class phrase", dict(class_phrase=""), "class_phrase", "class_phrase is empty"),
    (
        "token not in the prompt",
        dict(prompt="a photo of a dog"),
        "concept_token",
        "does not appear in the prompt",
    ),
    ("one step", dict(steps=1), "steps", "needs at least 2"),
]


@pytest.mark.parametrize("node", list(KNOBS))
@pytest.mark.parametrize("case, change, input_name, words", BAD, ids=[b[0] for b in BAD])
def test_what_needs_no_model_is_refused_before_the_run(
    nodes, node, case, change, input_name, words
):
    message = validate(nodes.NODE_CLASS_MAPPINGS[node], **values_for(node, **change))
    assert isinstance(message, str), message
    assert message.startswith("Layout-and-Retouch: ") and words in message
    assert f"'{input_name}'" in message


@pytest.mark.parametrize("node", list(KNOBS))
def test_a_step_knob_out_of_range_for_the_steps_is_refused_naming_it(nodes, node):
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    fits = {k: v for k, v in dict(lambda1=1, lambda2=1, mask_start=3).items() if k in KNOBS[node]}
    at_4 = values_for(node, steps=4, scale_with_steps=False, **fits)
    assert validate(cls, **at_4) is True
    for knob in KNOBS[node]:
        too_big = {"lambda1": 4, "lambda2": 5, "mask_start": 6}[knob]  # steps, steps+1, steps+2
        assert validate(cls, **dict(at_4, **{knob: too_big - 1})) is True
        message = validate(cls, **dict(at_4, **{knob: too_big}))
        assert isinstance(message, str) and f"'{knob}'" in message, (knob, message)
        assert "at 4 sampling steps" in message
        # below the minimum (ComfyUI skips its own min check for an input VALIDATE_INPUTS names)
        message = validate(cls, **values_for(node, **{knob: -1}))
        assert isinstance(message, str) and f"'{knob}'" in message, (knob, message)


def test_scaled_values_that_do_not_fit_say_so(nodes):
    cls = nodes.LayoutRetouchSampler
    message = validate(cls, **values_for("LayoutRetouchSampler", steps=4, lambda1=49))
    assert "scaled from the 49 you set for 50 steps" in message and "'lambda1'" in message


def test_layout_source_input_needs_a_latent_and_stage1_is_not_offered(nodes):
    from layout_retouch_comfy.inputs import UNCONNECTED

    cls = nodes.LayoutRetouchSampler
    values = values_for("LayoutRetouchSampler", layout_source="input")
    message = validate(cls, **values, latent=UNCONNECTED)
    assert isinstance(message, str) and "connect one" in message and "'layout_source'" in message
    assert validate(cls, **values, latent=None) is True  # connected: ComfyUI passes None
    message = validate(cls, **dict(values, layout_source="stage1"))
    assert isinstance(message, str) and "not offered in ComfyUI" in message


def test_layout_source_offers_what_comfyui_can_serve_in_its_words(nodes):
    kind, opts = nodes.LayoutRetouchSampler.INPUT_TYPES()["optional"]["layout_source"]
    assert kind == ["inversion", "input"]
    assert "infotext" not in opts["tooltip"] and "'latent'" in opts["tooltip"]
    assert "layout_source" not in nodes.LayoutRetouchRetouch.INPUT_TYPES()["optional"]


@pytest.mark.parametrize("node", ["LayoutRetouchSampler", "LayoutRetouchRetouch"])
def test_reference_subjects_sam_and_masks_are_optional(nodes, node):
    spec = nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()
    assert spec["optional"]["reference"][0] == "IMAGE"
    assert spec["optional"]["subjects"][0] == nodes.SUBJECTS_TYPE
    assert "reference" not in spec["required"]
    assert spec["optional"]["sam"][0] == nodes.SAM_TYPE
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    if node == "LayoutRetouchSampler":
        assert spec["optional"]["subject_mask"][0] == spec["optional"]["mask"][0] == "MASK"


@pytest.mark.parametrize("node", ["LayoutRetouchSampler", "LayoutRetouchRetouch"])
def test_a_node_without_photos_or_subjects_is_refused_and_a_chain_brings_its_own_words(nodes, node):
    from layout_retouch_comfy.inputs import UNCONNECTED

    cls = nodes.NODE_CLASS_MAPPINGS[node]
    message = validate(cls, **values_for(node, reference=UNCONNECTED))
    assert isinstance(message, str) and "no subject" in message and "'reference'" in message
    # the chain is every subject: the node's own words are not its (a token not in the prompt)
    chain = values_for(node, reference=UNCONNECTED, subjects=None, prompt="a zwx cat and a dog")
    assert validate(cls, **chain) is True
    message = validate(cls, **dict(chain, reference=None))  # photos connected: its own words
    assert isinstance(message, str) and "'sks' does not appear" in message


def test_the_subject_node_lists_loras_chains_and_refuses_naming_its_input(
    nodes, tmp_path, monkeypatch
):
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    (folder / "dog.safetensors").write_bytes(b"")
    cls = nodes.LayoutRetouchSubject
    spec = cls.INPUT_TYPES()
    assert spec["required"]["lora_name"][0] == ["None", "dog.safetensors"]
    kinds, opts = spec["required"]["personalization"]
    assert set(kinds) == {"dreambooth", "textual_inversion", "lora", "photo"}
    assert opts["default"] == "lora"
    loaded = []
    monkeypatch.setattr(
        nodes.CALLS,
        "load_lora",
        lambda name: loaded.append(name) or ({"w": 1} if name == "dog.safetensors" else None),
    )
    photo = torch.rand(1, 8, 8, 3)
    (one,) = cls().subject(photo, "lora", " sks ", " white  dog ", "dog.safetensors", 0.5)
    (two,) = cls().subject(photo, "photo", "", "cat", subjects=one)
    assert [(s.concept_token, s.class_phrase, s.lora_strength) for s in two] == [
        ("sks", "white dog", 0.5),
        ("", "cat", 1.0),
    ]
    assert two[0].lora == {"w": 1} and two[1].lora is None and loaded == ["dog.safetensors"]
    for bad, name in (
        (("lora", "sks", "dog", "None"), "lora_name"),
        (("photo", "", " ", "None"), "class_phrase"),
        (("dreambooth", "", "dog", "None"), "concept_token"),
        (("lora", "sks", "dog", "gone.safetensors"), "lora_name"),
        (("bogus", "sks", "dog", "None"), "personalization"),
    ):
        with pytest.raises(LayoutRetouchError) as e:
            cls().subject(photo, *bad)
        assert f"'{name}'" in str(e.value), (bad, str(e.value))
        if bad[3] != "gone.safetensors":  # a file gone since the list was made: only at the run
            message = cls.VALIDATE_INPUTS(*bad)
            assert isinstance(message, str) and f"'{name}'" in message, (bad, message)
    assert cls.VALIDATE_INPUTS("lora", "sks", "dog", "dog.safetensors") is True
    with pytest.raises(LayoutRetouchError, match="at most 4") as e:
        cls().subject(torch.rand(5, 8, 8, 3), "photo", "", "cat")
    assert "'reference'" in str(e.value)


def test_descriptions_are_one_paragraph(nodes):
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        text = cls.DESCRIPTION
        assert text and "\n" not in text and "  " not in text, text
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)


def test_outputs_keep_their_slots_and_regions_come_last(nodes):
    """Saved workflows link outputs by index: info stays where it was, regions (several subjects)
    was added after it."""
    slots = {
        "LayoutRetouchSampler": (
            "retouched",
            "layout",
            "blend_mask",
            "attention_map",
            "info",
            "regions",
        ),
        "LayoutRetouchRetouch": ("retouched", "blend_mask", "attention_map", "info", "regions"),
        "LayoutRetouchLayout": ("layout", "info"),
    }
    for name, names in slots.items():
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.RETURN_NAMES == names
        assert cls.RETURN_TYPES[names.index("info")] == "STRING"
        if "regions" in names:
            assert cls.RETURN_TYPES[-1] == "IMAGE"


def test_start_text_is_the_schedule_at_this_step_count(nodes):
    lambdas = dict(lambda1=5, lambda2=10, mask_start=31)
    assert nodes._start_text(4, lambdas, True) == (
        "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4 (scaled from 5 / 10 / 31 for 50 steps)"
    )
    assert nodes._start_text(4, dict(lambda1=9, lambda2=1, mask_start=3), False) == ""


def test_sam_loader_lists_models_sams_and_loads_the_segmenter(nodes, tmp_path, monkeypatch):
    from lib_layout_retouch import segmentation
    from tests.fixtures.sam import TINY_EMBED_DIM, TINY_KIND, build_tiny_sam

    folder = tmp_path / "models" / "sams"
    folder.mkdir(parents=True)
    torch.save(build_tiny_sam(seed=0).state_dict(), folder / "sam_tiny.pth")
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setitem(segmentation.SAM_BUILDERS, TINY_KIND, build_tiny_sam)
    monkeypatch.setitem(segmentation._KIND_BY_EMBED_DIM, TINY_EMBED_DIM, TINY_KIND)
    segmentation.clear_sam_cache()
    loader = nodes.LayoutRetouchSAMLoader
    names, _ = loader.INPUT_TYPES()["required"]["sam_name"]
    assert names == ["sam_tiny.pth"]  # SAM files only
    (segmenter,) = loader().load("sam_tiny.pth", "cpu")
    assert isinstance(segmenter, segmentation.SubjectSegmenter)
    with pytest.raises(LayoutRetouchError) as e:
        loader().load("gone.pth", "cpu")
    assert "'sam_name'" in str(e.value) and "models/sams" in str(e.value)
    (folder / "sam_vit_b_broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LayoutRetouchError) as e:
        loader().load("sam_vit_b_broken.pth", "cpu")
    assert "not a SAM checkpoint" in str(e.value) and "'sam_name'" in str(e.value)
    segmentation.clear_sam_cache()


def comfy_logs_a_failed_node(exc: Exception, logger: logging.Logger) -> None:
    """What ComfyUI's execution.py does with an exception raised by a node."""
    try:
        raise exc
    except Exception as ex:
        logger.error(f"!!! Exception during processing !!! {ex}")
        logger.error(traceback.format_exc())


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_refusal_is_logged_in_one_line_other_errors_with_their_traceback():
    logger = logging.getLogger("comfy-execution-standin")
    logger.propagate = False
    records = Records()
    logger.addHandler(records)
    texts.install_refusal_filter(logger)
    texts.install_refusal_filter(logger)  # once
    assert len(logger.filters) == 1
    refusal = LayoutRetouchError("concept_token is empty", parameter="concept_token")
    comfy_logs_a_failed_node(refusal, logger)
    assert records.lines == [
        "!!! Exception during processing !!! Layout-and-Retouch: concept_token is empty"
    ]
    records.lines.clear()
    comfy_logs_a_failed_node(ValueError("a bug"), logger)
    assert len(records.lines) == 2 and records.lines[1].startswith("Traceback")
    assert "ValueError: a bug" in records.lines[1]
    logger.error("Traceback (most recent call last): a log line outside an except")
    assert len(records.lines) == 3
    logger.removeHandler(records)
