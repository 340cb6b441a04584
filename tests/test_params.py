"""The one parameter object: coercion, validation, schedule, infotext and API (de)serialisation."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.images import image_fingerprint
from lib_layout_retouch.params import (
    FIELD_BY_NAME,
    FIELDS,
    LAYOUT_SOURCES,
    NO_SAM,
    PERSONALIZATION_KINDS,
    LayoutRetouchParams,
    SubjectParams,
    fingerprints_from_infotext,
    markdown_parameter_table,
)
from lib_layout_retouch.schedule import Schedule
from tests.paths import DOG_PHOTO as DOG

NAMES = [f.name for f in FIELDS]


def _photo() -> Image.Image:
    if DOG.exists():  # a real photo, made small so PNG encoding in the API tests stays fast
        return Image.open(DOG).reduce(6)
    y, x = np.mgrid[0:64, 0:48]
    return Image.fromarray(np.stack([x * 5, y * 3, x + y], -1).astype(np.uint8))


def _b64png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ready(**kw) -> LayoutRetouchParams:
    base = dict(
        enabled=True,
        reference_image=_photo(),
        vanilla_checkpoint="v1-5-pruned-emaonly.safetensors [6ce0161689]",
        concept_token="sks",
        class_phrase="dog",
    )
    base.update(kw)
    return LayoutRetouchParams(**base)


# A value for every field that differs from its default (for round trips).
NON_DEFAULT = dict(
    enabled=True,
    personalization="textual_inversion",
    vanilla_checkpoint="sd-v1-4.ckpt [fe4efff1e1]",
    concept_token="<my-vase>",
    class_phrase="red vase",
    reference_prompt="a photo of <my-vase> red vase, studio light",
    lambda1=3,
    lambda2=12,
    mask_start=35,
    scale_with_steps=False,
    sam_model="sam_vit_b_01ec64.pth",
    ca_threshold=0.05,
    show_intermediates=True,
    layout_source="stage1",
    reset_reference=False,
    layer_preset="light",
    stage1_text_encoder="loaded",
    subjects=(SubjectParams(_photo().rotate(90), "photo", "", "cat"),),
)


# ---- the field table ---------------------------------------------------------------------------
def test_fields_are_the_dataclass_in_order_with_matching_defaults():
    assert NAMES == [f.name for f in dataclasses.fields(LayoutRetouchParams)]
    assert NAMES == [
        "enabled",
        "reference_image",
        "personalization",
        "vanilla_checkpoint",
        "concept_token",
        "class_phrase",
        "reference_prompt",
        "lambda1",
        "lambda2",
        "mask_start",
        "scale_with_steps",
        "sam_model",
        "ca_threshold",
        "show_intermediates",
        "layout_source",
        "reset_reference",
        "layer_preset",
        "stage1_text_encoder",
        "subjects",  # last: positional clients of before keep their order
    ]
    defaults = LayoutRetouchParams()
    for f in FIELDS:
        assert getattr(defaults, f.name) == f.default, f.name
        assert f.kind in ("bool", "int", "float", "str", "choice", "image", "subjects")
        assert f.label and f.hint
    assert set(NON_DEFAULT) == set(NAMES) - {"reference_image"}


def test_field_metadata():
    assert (
        FIELD_BY_NAME["personalization"].choices
        == PERSONALIZATION_KINDS
        == ("dreambooth", "textual_inversion", "lora", "photo")
    )
    # `input`: img2img retouches the input image itself
    assert (
        FIELD_BY_NAME["layout_source"].choices == LAYOUT_SOURCES == ("inversion", "stage1", "input")
    )
    assert FIELD_BY_NAME["sam_model"].default == NO_SAM == "none"
    keys = [f.infotext_key for f in FIELDS if f.infotext_key]
    assert len(keys) == len(set(keys)) and all(k.startswith("LR ") for k in keys)
    # A1111's infotext parser only reads keys of this shape
    assert all(re.fullmatch(r"\w[\w \-/]+", k) for k in keys)
    assert FIELD_BY_NAME["enabled"].infotext_key is None
    assert FIELD_BY_NAME["show_intermediates"].infotext_key is None
    for f in FIELDS:
        if f.kind == "choice":
            assert len(f.choice_labels) == len(f.choices)


# ---- positional and named forms ----------------------------------------------------------------
def test_positional_form_in_ui_order():
    img = _photo()
    args = [
        True,
        img,
        "DreamBooth checkpoint",
        "v1-5.safetensors",
        "sks",
        "dog",
        "",
        3.0,
        12,
        "35",
        False,
        "None",
        0.05,
        True,
        "Stage-1 latents (faster)",
        False,
    ]
    p = LayoutRetouchParams.from_script_args(args)
    assert p == LayoutRetouchParams(
        enabled=True,
        reference_image=img,
        personalization="dreambooth",
        vanilla_checkpoint="v1-5.safetensors",
        concept_token="sks",
        class_phrase="dog",
        reference_prompt="",
        lambda1=3,
        lambda2=12,
        mask_start=35,
        scale_with_steps=False,
        sam_model="none",
        ca_threshold=0.05,
        show_intermediates=True,
        layout_source="stage1",
        reset_reference=False,
    )
    assert type(p.lambda1) is int and type(p.mask_start) is int and type(p.ca_threshold) is float


def test_shorter_positional_lists_and_nones_take_defaults():
    assert LayoutRetouchParams.from_script_args([]) == LayoutRetouchParams()
    assert LayoutRetouchParams.from_script_args(()) == LayoutRetouchParams()
    p = LayoutRetouchParams.from_script_args([True, None, "lora"])
    assert (p.enabled, p.reference_image, p.personalization, p.lambda1, p.reset_reference) == (
        True,
        None,
        "lora",
        5,
        True,
    )
    p = LayoutRetouchParams.from_script_args([None] * len(FIELDS))
    assert p == LayoutRetouchParams()


def test_too_many_positional_args():
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_script_args([False] * (len(FIELDS) + 1))
    assert "got 20 positional arguments but Layout-and-Retouch takes at most 19" in str(e.value)
    assert "enabled, reference_image, personalization" in str(e.value)


def test_named_dict_form_from_the_api():
    ui_defaults = [LayoutRetouchParams().__dict__[n] for n in NAMES[1:]]  # A1111 fills the rest
    d = {
        "enabled": True,
        "concept_token": "sks",
        "lambda1": "3",
        "reference_image": _b64png(_photo()),
    }
    p = LayoutRetouchParams.from_script_args([d, *ui_defaults])
    assert (p.enabled, p.concept_token, p.lambda1) == (True, "sks", 3)
    assert image_fingerprint(p.reference_image) == image_fingerprint(_photo())
    assert LayoutRetouchParams.from_script_args(d) == p
    assert LayoutRetouchParams.from_script_args([p]) is p
    assert LayoutRetouchParams.from_script_args(p) is p


def test_unknown_key_message():
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({"enabled": True, "lamda1": 3})
    assert e.value.parameter == "lamda1"
    assert str(e.value) == (
        "Layout-and-Retouch: unknown parameter 'lamda1' (did you mean 'lambda1'?); valid names are: "
        + ", ".join(NAMES)
    )
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({"xyz": 1})
    assert "unknown parameter 'xyz'; valid names are: enabled," in str(e.value)
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict([1, 2])  # type: ignore[arg-type]
    assert "must be a dict" in str(e.value)


# ---- coercion ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, given, expected",
    [
        ("enabled", True, True),
        ("enabled", 1, True),
        ("enabled", 0, False),
        ("enabled", "true", True),
        ("enabled", "FALSE", False),
        ("enabled", " True ", True),
        ("enabled", np.bool_(True), True),
        ("lambda1", 5, 5),
        ("lambda1", 5.0, 5),
        ("lambda1", "7", 7),
        ("lambda1", " 7 ", 7),
        ("lambda1", "-1", -1),
        ("lambda1", "4.0", 4),
        ("lambda1", np.int64(6), 6),
        ("ca_threshold", 0.2, 0.2),
        ("ca_threshold", "0.05", 0.05),
        ("ca_threshold", 1, 1.0),
        ("personalization", "DreamBooth", "dreambooth"),
        ("personalization", "DreamBooth checkpoint", "dreambooth"),
        ("personalization", "Textual Inversion", "textual_inversion"),
        ("personalization", "textual-inversion", "textual_inversion"),
        ("personalization", "Textual Inversion embedding", "textual_inversion"),
        ("personalization", "LoRA", "lora"),
        ("layout_source", "STAGE1", "stage1"),
        ("layout_source", "DDIM inversion of the layout (paper)", "inversion"),
        ("sam_model", "", "none"),
        ("sam_model", "None", "none"),
        ("sam_model", "sam_vit_b.pth", "sam_vit_b.pth"),
        ("concept_token", "  sks ", "sks"),
        ("reference_image", "", None),
    ],
)
def test_coercion(name, given, expected):
    value = getattr(LayoutRetouchParams.from_dict({name: given}), name)
    assert value == expected and type(value) is type(expected)


def test_none_takes_the_default():
    assert LayoutRetouchParams.from_dict({n: None for n in NAMES}) == LayoutRetouchParams()


@pytest.mark.parametrize(
    "name, given, message",
    [
        ("enabled", "maybe", "enabled must be true or false, got 'maybe' (str)"),
        ("enabled", 2, "enabled must be true or false, got 2 (int)"),
        ("lambda1", 5.5, "lambda1 must be a whole number, got 5.5 (float)"),
        ("lambda1", "five", "lambda1 must be a whole number, got 'five' (str)"),
        ("lambda1", True, "lambda1 must be a whole number, got True (bool)"),
        ("mask_start", [31], "mask_start must be a whole number, got [31] (list)"),
        ("ca_threshold", "abc", "ca_threshold must be a number, got 'abc' (str)"),
        ("ca_threshold", float("nan"), "ca_threshold must be a number, got nan (float)"),
        ("ca_threshold", False, "ca_threshold must be a number, got False (bool)"),
        ("concept_token", 5, "concept_token must be text, got 5 (int)"),
        (
            "personalization",
            "hypernetwork",
            "personalization is 'hypernetwork', which is not one of 'dreambooth', 'textual_inversion', "
            "'lora', 'photo': choose one of those",
        ),
        ("layout_source", 1, "layout_source must be text, got 1 (int)"),
        (
            "reference_image",
            "/work/shared/data/vico/brown_dog/00.jpg",
            "not valid base64 image data",
        ),
    ],
)
def test_bad_types(name, given, message):
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({name: given})
    assert e.value.parameter == name
    assert message in str(e.value)


def test_construction_coerces_too():
    p = LayoutRetouchParams(lambda1="4", enabled="true", personalization="LoRA")  # type: ignore[arg-type]
    assert (p.lambda1, p.enabled, p.personalization) == (4, True, "lora")


def test_reference_image_forms():
    photo = _photo()
    want = image_fingerprint(photo)
    for value in (
        photo,
        np.asarray(photo.convert("RGB")),
        {"image": _b64png(photo), "mask": None},
        "data:image/png;base64," + _b64png(photo),
    ):
        p = LayoutRetouchParams.from_dict({"reference_image": value})
        assert image_fingerprint(p.reference_image.convert("RGB")) == image_fingerprint(
            photo.convert("RGB")
        )
    assert image_fingerprint(LayoutRetouchParams(reference_image=photo).reference_image) == want


# ---- validation --------------------------------------------------------------------------------
def _refused(p: LayoutRetouchParams):
    """The parameter `validate` names, or None when it accepts `p`."""
    try:
        p.validate()
    except LayoutRetouchError as e:
        return e.parameter
    return None


def test_validate_accepts_the_defaults_and_ready_params():
    assert _refused(LayoutRetouchParams()) is None  # disabled: incomplete is fine
    assert _refused(LayoutRetouchParams(enabled=True)) == "reference_image"  # ... but not enabled
    assert _refused(_ready()) is None
    assert _refused(_ready(vanilla_checkpoint="")) == "vanilla_checkpoint"  # DreamBooth needs it
    for kind in ("lora", "textual_inversion"):  # the others do not
        assert _refused(_ready(personalization=kind, vanilla_checkpoint="")) is None
    # upper step limits are checked by schedule(steps), not here
    assert _refused(_ready(lambda1=200, lambda2=200, mask_start=300)) is None


@pytest.mark.parametrize(
    "edge, past",
    [
        (dict(lambda1=0), dict(lambda1=-1)),
        (dict(lambda2=0), dict(lambda2=-1)),
        (dict(mask_start=2), dict(mask_start=1)),
        (dict(ca_threshold=0.999), dict(ca_threshold=1.0)),
        (dict(ca_threshold=0.001), dict(ca_threshold=0.0)),
    ],
)
def test_validate_takes_each_bound_and_refuses_one_past_it(edge, past):
    assert _refused(_ready(**edge)) is None
    assert _refused(_ready(**past)) == next(iter(past))


@pytest.mark.parametrize(
    "change, parameter, message",
    [
        (
            dict(lambda1=-1),
            "lambda1",
            "lambda1 (λ1, the number of first steps drawn by the vanilla model) is -1 but must be 0 or "
            "more: set it to 0 or more (paper: 5 at 50 steps)",
        ),
        (
            dict(lambda2=-3),
            "lambda2",
            "lambda2 (λ2, the number of first retouch steps that copy the layout) is -3 but must be 0 or more",
        ),
        (
            dict(mask_start=1),
            "mask_start",
            "mask_start (the first retouch step that blends the subject mask) is 1 but must be 2 or more",
        ),
        (
            dict(ca_threshold=0.0),
            "ca_threshold",
            "ca_threshold (the threshold of the cross-attention mask) is 0.0 but must be between 0 and 1 "
            "(exclusive): try 0.1 (MasaCtrl) or 0.05 (DreamMatcher)",
        ),
        (dict(ca_threshold=1), "ca_threshold", "is 1.0 but must be between 0 and 1"),
        (dict(ca_threshold=-0.5), "ca_threshold", "is -0.5 but must be between 0 and 1"),
        (
            dict(reference_image=None),
            "reference_image",
            "no reference_image: upload one photo of your subject",
        ),
        (
            dict(concept_token=""),
            "concept_token",
            "concept_token is empty: enter the word that stands for your subject, e.g. sks or <my-vase>",
        ),
        (
            dict(class_phrase="  "),
            "class_phrase",
            "class_phrase is empty: enter what a normal model calls your subject, e.g. dog or red vase",
        ),
        (
            dict(vanilla_checkpoint=""),
            "vanilla_checkpoint",
            "vanilla_checkpoint is empty, but personalization 'dreambooth' needs it: choose the original "
            "checkpoint your DreamBooth model was fine-tuned from",
        ),
    ],
)
def test_validation_messages(change, parameter, message):
    p = _ready(**change)
    with pytest.raises(LayoutRetouchError) as e:
        p.validate()
    assert e.value.parameter == parameter
    assert message in str(e.value)


def test_ranges_are_checked_even_when_disabled_but_needs_only_when_enabled():
    with pytest.raises(LayoutRetouchError):
        LayoutRetouchParams(lambda1=-1).validate()
    LayoutRetouchParams(concept_token="", reference_image=None).validate()


def test_validate_catches_values_assigned_after_construction():
    p = _ready()
    p.lambda1 = "x"  # type: ignore[assignment]
    with pytest.raises(LayoutRetouchError) as e:
        p.validate()
    assert e.value.parameter == "lambda1"


# ---- schedule ----------------------------------------------------------------------------------
def test_schedule_scaled_and_unscaled():
    assert _ready().schedule(50) == Schedule(50, 5, 10, 31)
    assert _ready().schedule(20) == Schedule(20, 2, 4, 13)
    assert _ready(lambda1=3, mask_start=15, scale_with_steps=False).schedule(20) == Schedule(
        20, 3, 10, 15
    )
    with pytest.raises(LayoutRetouchError) as e:  # 31 as given does not fit 20 steps
        _ready(scale_with_steps=False).schedule(20)
    assert e.value.parameter == "mask_start" and "between 2 and 21" in str(e.value)
    with pytest.raises(LayoutRetouchError) as e:
        _ready(lambda1=49).schedule(20)
    assert e.value.parameter == "lambda1" and "scaled from the 49" in str(e.value)


# ---- infotext ----------------------------------------------------------------------------------
def test_infotext_exact():
    p = _ready()
    info = p.to_infotext(20, mask_kind="CA only")
    assert info == {
        "LR personalization": "dreambooth",
        "LR vanilla checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
        "LR concept token": "sks",
        "LR class phrase": "dog",
        "LR lambda1": "5",
        "LR lambda2": "10",
        "LR mask start": "31",
        "LR scale with steps": "True",
        "LR SAM model": "none",
        "LR CA threshold": "0.1",
        "LR layout source": "inversion",
        "LR reset reference": "True",
        "LR layer preset": "standard",
        "LR stage-1 text encoder": "vanilla",
        "LR steps used": "λ1=2, λ2=4, mask from step 13 of 20",
        "LR mask": "CA only",
        "LR reference": image_fingerprint(_photo()),
    }
    assert "LR reference prompt" not in info  # only when set
    assert _ready(reference_prompt="a dog").to_infotext(20)["LR reference prompt"] == "a dog"
    assert "LR mask" not in p.to_infotext(20)
    assert LayoutRetouchParams().to_infotext(20) == {}
    assert _ready(enabled=False).to_infotext(20) == {}


def test_infotext_round_trip_gives_back_every_field():
    p = _ready(**NON_DEFAULT)
    back = LayoutRetouchParams.from_infotext(p.to_infotext(40, mask_kind="SAM+CA"))
    expected = {
        n: getattr(p, n) for n in NAMES if n not in ("reference_image", "show_intermediates")
    }
    if p.personalization != "dreambooth":  # the hidden DreamBooth-only fields are not recorded
        expected["vanilla_checkpoint"] = ""
        expected["stage1_text_encoder"] = "vanilla"  # (read back as the default)
    # subjects after the first come back as what the infotext holds: their words and the photos'
    # fingerprints (the UI matches them to the photos it has; empty words are not written)
    photo = image_fingerprint(NON_DEFAULT["subjects"][0].reference_image)
    expected["subjects"] = (
        {"reference_fingerprints": [photo], "personalization": "photo", "class_phrase": "cat"},
    )
    assert back == expected
    # and the defaults, where empty text fields are not written
    q = _ready()
    back = LayoutRetouchParams.from_infotext(q.to_infotext(50))
    assert back == {
        n: getattr(q, n) for n in NAMES if n not in ("reference_image", "show_intermediates")
    }
    assert back["reference_prompt"] == ""


# A1111's own infotext text format (modules/infotext_utils.py, v1.10): written with `quote`,
# read back with `re_param` and `unquote`.
def _a1111_quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _a1111_parse(line):
    res = {}
    for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line):
        if v and v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        res[k] = v
    return res


def test_infotext_survives_a1111_text_format():
    p = _ready(**NON_DEFAULT)
    info = {"Steps": "30", "Sampler": "DDIM", **p.to_infotext(40, mask_kind="SAM+CA")}
    line = ", ".join(f"{k}: {_a1111_quote(v)}" for k, v in info.items())
    parsed = _a1111_parse(line)
    assert parsed == info
    back = LayoutRetouchParams.from_infotext(parsed)
    assert back["reference_prompt"] == "a photo of <my-vase> red vase, studio light"
    assert back["concept_token"] == "<my-vase>" and back["ca_threshold"] == 0.05


def test_from_infotext_without_lr_keys_and_with_bad_values():
    assert LayoutRetouchParams.from_infotext({"Steps": "20", "Seed": "1"}) == {}
    back = LayoutRetouchParams.from_infotext({"LR lambda1": "abc", "LR concept token": "sks"})
    assert back["enabled"] is True and back["concept_token"] == "sks"
    assert "lambda1" not in back  # unparseable: left out, paste keeps the UI's value
    assert back["lambda2"] == 10  # missing: default
    assert "reference_image" not in back and "show_intermediates" not in back


# ---- API ---------------------------------------------------------------------------------------
def test_api_dict_round_trip():
    p = _ready(**NON_DEFAULT)
    d = p.to_api_dict()
    assert list(d) == NAMES
    assert isinstance(d["reference_image"], str)
    json.dumps(d)  # JSON-ready
    q = LayoutRetouchParams.from_dict(d)
    for n in NAMES:
        if n not in ("reference_image", "subjects"):
            assert getattr(q, n) == getattr(p, n), n
    assert image_fingerprint(q.reference_image) == image_fingerprint(p.reference_image)
    assert [s.to_dict(images=False) for s in q.subjects] == [
        s.to_dict(images=False) for s in p.subjects
    ]
    assert [image_fingerprint(s.reference_image) for s in q.subjects] == [
        image_fingerprint(s.reference_image) for s in p.subjects
    ]
    assert (
        LayoutRetouchParams.from_dict(LayoutRetouchParams().to_api_dict()) == LayoutRetouchParams()
    )
    assert LayoutRetouchParams().to_api_dict()["reference_image"] is None


def test_api_dict_for_modes_png_cannot_store():
    p = LayoutRetouchParams(reference_image=Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    q = LayoutRetouchParams.from_dict(p.to_api_dict())
    assert q.reference_image.convert("RGB").getpixel((1, 1)) == (255, 0, 0)


def test_markdown_parameter_table():
    table = markdown_parameter_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| name | default | meaning |"
    assert len(lines) == 2 + len(FIELDS)
    assert [ln.split("|")[1].strip().strip("`") for ln in lines[2:]] == NAMES
    assert "| `lambda1` | `5` | **λ1: vanilla layout steps.**" in table
    assert "One of `dreambooth`, `textual_inversion`, `lora`, `photo`." in table
    assert "e.g. sks or &lt;my-vase&gt;." in table and "<my-vase>" not in table  # no stray HTML


def test_vanilla_checkpoint_is_recorded_for_dreambooth_only():
    for kind in ("textual_inversion", "lora"):
        info = _ready(personalization=kind, vanilla_checkpoint="v1-5.safetensors").to_infotext(20)
        assert "LR vanilla checkpoint" not in info and info["LR personalization"] == kind
    info = _ready(personalization="dreambooth", vanilla_checkpoint="v1-5.safetensors").to_infotext(
        20
    )
    assert info["LR vanilla checkpoint"] == "v1-5.safetensors"


# ---- several reference photos ----------------------------------------------------------------
def _photos(n):
    base = np.asarray(_photo().convert("RGB"))
    return [Image.fromarray(np.roll(base, 7 * i, axis=1)) for i in range(n)]


def test_four_references_are_accepted_and_all_used():
    """Four photos are accepted and all used (five are refused: the next test)."""
    photos = _photos(4)
    p = _ready(reference_image=[_b64png(x) for x in photos])
    p.validate()
    assert [image_fingerprint(x) for x in p.references] == [image_fingerprint(x) for x in photos]
    assert len(set(p.reference_fingerprints())) == 4


def test_one_string_still_gives_one_image_and_the_same_infotext():
    photo = _photo()
    p = _ready(reference_image=_b64png(photo))
    assert isinstance(p.reference_image, Image.Image) and len(p.references) == 1
    assert p.to_infotext(20)["LR reference"] == image_fingerprint(
        photo
    )  # as before: the fingerprint alone
    assert LayoutRetouchParams().references == []


def test_a_list_of_references_parses_validates_and_records_every_fingerprint():
    photos = _photos(3)
    p = _ready(reference_image=[_b64png(x) for x in photos])
    p.validate()
    assert [image_fingerprint(x) for x in p.references] == [image_fingerprint(x) for x in photos]
    prints = [image_fingerprint(x) for x in photos]
    assert len(set(prints)) == 3
    assert p.to_infotext(20)["LR reference"] == ", ".join(prints)
    assert p.reference_fingerprints() == prints
    # a list of one is one reference; empty entries (an empty UI slot) are skipped
    assert len(_ready(reference_image=[None, _b64png(photos[0]), ""]).references) == 1
    assert LayoutRetouchParams(reference_image=[None, ""]).reference_image is None


def test_several_references_api_round_trip():
    photos = _photos(2)
    p = _ready(reference_image=photos)
    d = p.to_api_dict()
    assert isinstance(d["reference_image"], list) and len(d["reference_image"]) == 2
    json.dumps(d)
    q = LayoutRetouchParams.from_dict(d)
    assert q.reference_fingerprints() == p.reference_fingerprints()
    assert [image_fingerprint(x) for x in q.references] == [image_fingerprint(x) for x in photos]


def test_too_many_references_names_the_limit():
    with pytest.raises(LayoutRetouchError) as e:
        _ready(reference_image=[_b64png(x) for x in _photos(5)])
    assert e.value.parameter == "reference_image"
    assert "has 5 photos but at most 4 are used: remove 1 of them" in str(e.value)


def test_a_bad_photo_among_several_is_named_by_its_index():
    good = _b64png(_photo())
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({"reference_image": [good, "not base64 !!", good]})
    assert e.value.parameter == "reference_image"
    message = str(e.value)
    assert "reference photo 2 of 3: reference_image is not valid base64 image data" in message
    assert "send the image file's bytes base64-encoded" in message  # the fix
    # one bad photo alone: the message as before, no index
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({"reference_image": "not base64 !!"})
    assert "reference photo" not in str(e.value)


def test_infotext_paste_of_several_fingerprints():
    photos = _photos(3)
    p = _ready(reference_image=photos)
    info = {"Steps": "20", **p.to_infotext(20)}
    line = ", ".join(f"{k}: {_a1111_quote(v)}" for k, v in info.items())
    parsed = _a1111_parse(line)
    assert parsed["LR reference"] == ", ".join(image_fingerprint(x) for x in photos)
    assert fingerprints_from_infotext(parsed) == [image_fingerprint(x) for x in photos]
    back = LayoutRetouchParams.from_infotext(parsed)
    assert back["concept_token"] == "sks" and "reference_image" not in back
    one = _ready().to_infotext(20)
    assert fingerprints_from_infotext(one) == [image_fingerprint(_photo())]
    assert fingerprints_from_infotext({"Steps": "20"}) == []


def test_layout_source_input_parses_by_value_and_label():
    assert LayoutRetouchParams(layout_source="input").layout_source == "input"
    assert (
        LayoutRetouchParams(layout_source="The input image itself (img2img)").layout_source
        == "input"
    )
    back = LayoutRetouchParams.from_infotext(_ready(layout_source="input").to_infotext(20))
    assert back["layout_source"] == "input"


def test_layout_source_input_needs_no_vanilla_checkpoint_in_dreambooth_mode():
    """'input' retouches the img2img input itself: no stage 1, so no vanilla model is ever loaded."""
    from tests.paths import DOG_PHOTO

    photo = Image.open(DOG_PHOTO)
    base = dict(
        enabled=True,
        reference_image=photo,
        personalization="dreambooth",
        concept_token="sks",
        class_phrase="dog",
        vanilla_checkpoint="",
    )
    LayoutRetouchParams(layout_source="input", **base).validate()
    assert not LayoutRetouchParams(layout_source="input", **base).needs_vanilla_checkpoint
    assert LayoutRetouchParams(layout_source="stage1", **base).needs_vanilla_checkpoint
    assert not LayoutRetouchParams(
        layout_source="stage1", **dict(base, personalization="lora")
    ).needs_vanilla_checkpoint
    assert [
        LayoutRetouchParams(layout_source=s).runs_stage1 for s in ("inversion", "stage1", "input")
    ] == [True, True, False]
    with pytest.raises(LayoutRetouchError, match="vanilla_checkpoint is empty"):
        LayoutRetouchParams(layout_source="inversion", **base).validate()


def test_validate_names_every_problem_at_once():
    """No photo, no concept token, λ1 < 0 and a threshold of 2: one error naming all four, in table
    order, each with its parameter; the error's parameter is the first's."""
    params = LayoutRetouchParams(
        enabled=True, class_phrase="dog", vanilla_checkpoint="v", lambda1=-1, ca_threshold=2.0
    )
    problems = params.problems()
    assert [p.parameter for p in problems] == [
        "lambda1",
        "ca_threshold",
        "reference_image",
        "concept_token",
    ]
    with pytest.raises(LayoutRetouchError) as e:
        params.validate()
    assert e.value.parameter == "lambda1"
    assert [str(p) for p in e.value.problems] == [str(p) for p in problems]
    assert str(e.value).startswith("Layout-and-Retouch: 4 problems: (1) lambda1 ")
    assert LayoutRetouchParams().problems() == []  # disabled: nothing is needed


def test_combine_flattens_keeps_one_problem_per_parameter_and_returns_a_single_one_as_is():
    from lib_layout_retouch.errors import combine

    a = LayoutRetouchError("a is bad", parameter="a")
    b = LayoutRetouchError("b is bad", parameter="b")
    again = LayoutRetouchError("a is bad in another way", parameter="a")
    assert combine([a]) is a
    both = combine([a, b])
    assert str(both) == "Layout-and-Retouch: 2 problems: (1) a is bad; (2) b is bad"
    assert combine([both, again]).problems == [a, b]  # flattened; the second 'a' left out
    with pytest.raises(ValueError):
        combine([])
