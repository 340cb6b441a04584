"""The paper's three prompts (y_p, y_p⁻, y_r), subject token positions, and the UI's guess."""

from __future__ import annotations

import pytest

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.prompts import (
    RetouchPrompts,
    derive_prompts,
    guess_concept,
    subject_token_positions,
)


@pytest.mark.parametrize(
    "prompt, token, cls, layout",
    [
        # class phrase follows the token: token and the now-double space go
        ("a sks dog jumping over a fence", "sks", "dog", "a dog jumping over a fence"),
        ("sks dog on a beach", "sks", "dog", "dog on a beach"),
        ("a sks  dog", "sks", "dog", "a dog"),
        ("<v> red vase on a table", "<v>", "red vase", "red vase on a table"),
        ("a <v> red  vase", "<v>", "red vase", "a red  vase"),
        ("a sks Dog", "sks", "dog", "a Dog"),  # class compared case-insensitively
        # otherwise the token is replaced by the class phrase
        (
            "a photo of <my-vase> on a beach",
            "<my-vase>",
            "red vase",
            "a photo of red vase on a beach",
        ),
        ("a sks doghouse", "sks", "dog", "a dog doghouse"),  # dog must end at a word boundary
        ("sks", "sks", "dog", "dog"),
        # whole token: 'asks' is no occurrence; case-insensitive as CLIP (it lowercases): 'SKS' is
        ("he asks a sks dog", "sks", "dog", "he asks a dog"),
        ("a SKS toy and a sks dog", "sks", "dog", "a dog toy and a dog"),
        ("a photo of SKS dog", "sks", "dog", "a photo of dog"),
        ("a photo of sks dog", "SKS", "dog", "a photo of dog"),
        # inside A1111 emphasis
        ("a (sks:1.2) on grass", "sks", "dog", "a (dog:1.2) on grass"),
        ("a [sks] on grass", "sks", "dog", "a [dog] on grass"),
        ("a (sks dog:1.2), grass", "sks", "dog", "a (dog:1.2), grass"),
        # every occurrence, each decided on its own
        ("a sks dog and a sks, by a sks", "sks", "dog", "a dog and a dog, by a dog"),
        # an extra-network tag is not prompt text and is never rewritten
        ("<lora:sks:0.8> a sks dog", "sks", "dog", "<lora:sks:0.8> a dog"),
    ],
)
def test_layout_prompt(prompt, token, cls, layout):
    p = derive_prompts(prompt, token, cls)
    assert p.layout == layout
    assert p.personalized == prompt


def test_all_three_prompts_and_defaults():
    p = derive_prompts("a photo of <my-vase> on a beach", " <my-vase> ", "  red   vase ")
    assert p == RetouchPrompts(
        personalized="a photo of <my-vase> on a beach",
        layout="a photo of red vase on a beach",
        reference="a photo of <my-vase> red vase",
        concept_token="<my-vase>",
        class_phrase="red vase",
    )


def test_reference_prompt_override_is_stripped_and_blank_means_default():
    assert derive_prompts("a sks dog", "sks", "dog", "  a sks dog, studio light ").reference == (
        "a sks dog, studio light"
    )
    assert derive_prompts("a sks dog", "sks", "dog", "   ").reference == "a photo of sks dog"
    assert derive_prompts("a sks dog", "sks", "dog", None).reference == "a photo of sks dog"
    # any text is allowed, even without the token
    assert derive_prompts("a sks dog", "sks", "dog", "a dog").reference == "a dog"


def test_empty_token_error():
    with pytest.raises(LayoutRetouchError) as e:
        derive_prompts("a sks dog", "  ", "dog")
    assert e.value.parameter == "concept_token"
    assert "enter the word that stands for your subject, e.g. sks or <my-vase>" in str(e.value)


def test_token_not_in_prompt_error_quotes_both_and_says_how_to_fix():
    with pytest.raises(LayoutRetouchError) as e:
        derive_prompts("he asks for a dog", "sks", "dog")
    msg = str(e.value)
    assert e.value.parameter == "concept_token"
    assert "'sks'" in msg and "'he asks for a dog'" in msg
    assert "write it in the prompt" in msg and "change the concept token" in msg
    # only inside an extra-network tag does not count either
    with pytest.raises(LayoutRetouchError):
        derive_prompts("<lora:sks:1> a dog", "sks", "dog")


def test_empty_class_phrase_error():
    with pytest.raises(LayoutRetouchError) as e:
        derive_prompts("a sks dog", "sks", "   ")
    assert e.value.parameter == "class_phrase"
    assert "class_phrase is empty" in str(e.value)


# A word-level stand-in for CLIP's tokenizer: ids without BOS/EOS, like the real one.
_VOCAB: dict[str, int] = {}


def _tokenize(text: str) -> list[int]:
    return [_VOCAB.setdefault(w, len(_VOCAB) + 1) for w in text.lower().split()]


def test_subject_positions_first_chunk_skip_bos():
    # ids: a=0 photo=1 of=2 red=3 vase=4 on=5 a=6 red=7 vase=8 → rows +1 (BOS at 0)
    pos = subject_token_positions(_tokenize, "a photo of red vase on a red vase", ["red vase"])
    assert pos == [4, 5, 8, 9]


def test_subject_positions_several_phrases_sorted_unique():
    pos = subject_token_positions(_tokenize, "a dog and a dog toy", ["dog toy", "dog", "cat"])
    assert pos == [2, 5, 6]


def test_subject_positions_in_later_chunks():
    # 80 filler words, then the subject: index 80 is in chunk 1 at offset 5 → 77 + 5 + 1 = 83
    prompt = " ".join(["x"] * 80 + ["dog"])
    assert subject_token_positions(_tokenize, prompt, ["dog"]) == [83]
    # index 74 (last of chunk 0) → 75; index 75 (first of chunk 1) → 78
    prompt = " ".join(["x"] * 74 + ["dog", "dog"])
    assert subject_token_positions(_tokenize, prompt, ["dog"]) == [75, 78]
    # other chunk lengths
    assert subject_token_positions(_tokenize, "x x x dog", ["dog"], chunk_length=2) == [6]


def test_subject_positions_none_found():
    with pytest.raises(LayoutRetouchError) as e:
        subject_token_positions(_tokenize, "a photo of a cat", ["dog", ""])
    assert e.value.parameter == "class_phrase"
    assert "'dog'" in str(e.value) and "'a photo of a cat'" in str(e.value)


def test_subject_positions_with_a_real_clip_tokenizer(tiny_clip_dir):
    """transformers' CLIPTokenizer (CLIP's BPE, with the project's tiny vocabulary)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir)

    def tokenize(text):
        return tok(text, add_special_tokens=False).input_ids

    assert subject_token_positions(tokenize, "a photo of a red vase on a beach", ["red vase"]) == [
        5,
        6,
    ]
    # a word outside the vocabulary is split into several BPE tokens: all of them are the subject
    assert len(tokenize("zqx")) == 3
    assert subject_token_positions(tokenize, "a zqx dog", ["zqx"]) == [2, 3, 4]


@pytest.mark.parametrize(
    "prompt, known, expected",
    [
        ("a photo of <my-vase> on a beach", ["other", "<my-vase>"], ("<my-vase>", "")),
        ("a cat-emb and a dog-emb", ["dog-emb", "cat-emb"], ("cat-emb", "")),  # first in the prompt
        ("a sks dog jumping", [], ("sks", "dog")),
        ("photo of ohwx man, studio", [], ("ohwx", "man")),
        ("[zwx] cat", [], ("zwx", "cat")),
        ("a sks on the beach", [], ("sks", "")),  # "on" is no class word
        ("portrait of sks", [], ("sks", "")),
        ("a vase <lora:myvase:0.8>", [], ("myvase", "")),
        ("a sks dog <lora:watercolor:0.6>", [], ("sks", "dog")),  # rare token beats a style LoRA
        ("he asks for a dog", ["emb"], None),
        ("", [], None),
    ],
)
def test_guess_concept(prompt, known, expected):
    assert guess_concept(prompt, known) == expected


def test_one_extra_network_rule_the_webuis():
    """The glue strips tags with the library's rule, which is A1111's `<(\\w+):([^>]+)>`."""

    from lib_layout_retouch.prompts import EXTRA_NETWORK_TAG, strip_extra_networks

    assert EXTRA_NETWORK_TAG.pattern == r"<(\w+):([^>]+)>"
    assert (
        strip_extra_networks("a sks dog <lora:dog:0.8> <hypernet:x:1>, <my-vase>")
        == "a sks dog  , <my-vase>"
    )
    from tests.test_glue_library import glue_files

    glue = "".join(open(f, encoding="utf-8").read() for f in glue_files())
    assert "re.compile" not in glue and "strip_extra_networks(" in glue
