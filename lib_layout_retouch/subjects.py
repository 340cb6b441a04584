"""Several subjects in one image (docs/ALGORITHM.md, "Several subjects"): each subject's words, its
reference prompt, and its own conditioning rows — so that each subject's region is found from its
own tokens and retouched from its own photos only.

A subject is named in the prompt by its concept token (what its LoRA, Textual-Inversion embedding or
DreamBooth checkpoint learned) followed by its class phrase, ``a sks dog and zwx cat on a sofa``;
a subject with no trained model at all (photo only) is named by its class phrase alone,
``a dog and a cat``. The prompts of the paper generalise:

- y_p⁻ (stage 1's layout prompt): every concept token replaced by its class phrase (or dropped where
  the class phrase follows it): ``a dog and cat on a sofa``;
- y_r of subject k, for its reference photos: ``a photo of sks dog``;
- y_r of the target: all subjects, ``a photo of sks dog and zwx cat``.
One subject with a concept token is exactly `prompts.derive_prompts`.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

from .errors import LayoutRetouchError
from .prompts import (
    NO_CLASS_PHRASE,
    RetouchPrompts,
    SubjectWords,
    _layout_prompt,
    _token_matches,
    derive_prompts,
)

MAX_SUBJECTS = 3


def subject_error(message: str, k: int, parameter: str) -> LayoutRetouchError:
    """A refusal that names the subject (1-based) — subject 1 is the panel's own fields."""
    where = f"subject {k + 1}: " if k else ""
    return LayoutRetouchError(where + message, parameter=parameter)


def derive_subject_prompts(
    prompt: str, subjects: Sequence[SubjectWords], reference_prompt: Optional[str] = None
) -> RetouchPrompts:
    """y_p, y_p⁻ and the y_r prompts of K ≥ 1 subjects (see the module doc); `reference_prompt`
    replaces the target's y_r. Refuses, naming the subject: no class phrase, a concept token not in
    the prompt, two subjects with one concept token, more subjects than MAX_SUBJECTS."""
    subjects = list(subjects)
    if not subjects:
        raise LayoutRetouchError("no subject given", parameter="subjects")
    if len(subjects) > MAX_SUBJECTS:
        raise LayoutRetouchError(
            f"{len(subjects)} subjects given; at most {MAX_SUBJECTS} are supported: remove "
            f"{len(subjects) - MAX_SUBJECTS}",
            parameter="subjects",
        )
    if len(subjects) == 1 and subjects[0].concept_token.strip():
        return derive_prompts(
            prompt, subjects[0].concept_token, subjects[0].class_phrase, reference_prompt
        )
    prompt = prompt or ""
    words = [_checked(prompt, s, k) for k, s in enumerate(subjects)]
    _check_distinct_tokens(words)
    layout = prompt
    for s in words:
        if s.concept_token:
            layout = _layout_prompt(layout, _token_matches(layout, s.concept_token), s.class_phrase)
    target = (reference_prompt or "").strip() or "a photo of " + " and ".join(
        s.label for s in words
    )
    return RetouchPrompts(
        personalized=prompt,
        layout=layout,
        reference=target,
        concept_token=words[0].concept_token,
        class_phrase=words[0].class_phrase,
        subjects=tuple(words),
    )


def _checked(prompt: str, subject: SubjectWords, k: int) -> SubjectWords:
    phrase = " ".join((subject.class_phrase or "").split())
    if not phrase:
        raise subject_error(NO_CLASS_PHRASE, k, "class_phrase")
    token = (subject.concept_token or "").strip()
    if token and not _token_matches(prompt, token):
        raise subject_error(
            f"the concept token '{token}' does not appear in the prompt '{prompt}': write it where "
            f"this subject goes, e.g. '{token} {phrase}'",
            k,
            "concept_token",
        )
    if not token and not _phrase_in(prompt, phrase):
        raise subject_error(
            f"the class phrase '{phrase}' does not appear in the prompt '{prompt}': a subject "
            "known from its photos only is named by its class phrase, e.g. 'a dog and a cat'",
            k,
            "class_phrase",
        )
    return SubjectWords(token, phrase)


def _phrase_in(prompt: str, phrase: str) -> bool:
    words = r"\s+".join(re.escape(w) for w in phrase.split())
    return re.search(r"(?<!\w)" + words + r"(?!\w)", prompt, re.IGNORECASE) is not None


def _check_distinct_tokens(words: Sequence[SubjectWords]) -> None:
    seen: dict[str, int] = {}
    for k, s in enumerate(words):
        key = s.concept_token.lower()
        if key and key in seen:
            raise subject_error(
                f"the concept token '{s.concept_token}' is subject {seen[key] + 1}'s too: each "
                "subject needs its own (e.g. sks and zwx)",
                k,
                "concept_token",
            )
        if key:
            seen[key] = k


def subject_rows(
    rows_of: Callable[[str, Sequence[str]], list[int]], prompt: str, words: Sequence[SubjectWords]
) -> list[list[int]]:
    """Each subject's conditioning rows in `prompt` (`rows_of(prompt, phrases)`: the family's
    subject_tokens). Two subjects may not share a row: their regions would be one — the usual cause
    is one class phrase for both, or one inside the other ('dog' and 'white dog')."""
    rows = [rows_of(prompt, s.phrases) for s in words]
    for k in range(len(rows)):
        for j in range(k):
            shared = set(rows[k]) & set(rows[j])
            if shared:
                raise subject_error(
                    f"its words '{words[k].label}' and subject {j + 1}'s '{words[j].label}' "
                    "share tokens in the prompt, so their regions cannot be told apart: give "
                    "each subject a class phrase of its own (e.g. 'white dog' and 'brown dog' "
                    "become 'dog' and 'puppy', or 'terrier' and 'poodle')",
                    k,
                    "class_phrase",
                )
    return rows


LORA = "lora"  # the personalization of a subject learned as a LoRA


def subject_loras(subjects: Sequence, tags: Sequence[str]) -> list[Optional[str]]:
    """Which of the prompt's LoRA tags (`tags`: their names, in prompt order) is each subject's:
    None for a subject not learned as a LoRA. A subject's `lora` names its tag; an empty one takes
    the tags no subject names, in order, over the LoRA subjects in order. Refuses, naming the
    subject: a named tag not in the prompt, one tag for two subjects, no tag left."""
    tags = list(tags)
    named = [
        _lora_name(getattr(s, "lora", "")) if s.personalization == LORA else None for s in subjects
    ]
    out: list[Optional[str]] = [None] * len(subjects)
    for k, name in enumerate(named):
        if not name:
            continue
        match = _find_tag(name, tags)
        if match is None:
            listed = ", ".join(tags) or "none"
            raise subject_error(
                f"its LoRA '{name}' is not among the prompt's LoRA tags ({listed}): add "
                f"<lora:{name}:1> to the prompt, or name one of those",
                k,
                _lora_parameter(k),
            )
        if match in out:
            raise subject_error(
                f"its LoRA '{match}' is subject {out.index(match) + 1}'s too: each LoRA subject "
                "needs a LoRA of its own",
                k,
                _lora_parameter(k),
            )
        out[k] = match
    free = [t for t in tags if t not in out]
    for k, name in enumerate(named):
        if name is None or name:
            continue
        if not free:
            listed = ", ".join(tags) or "none"
            raise subject_error(
                f"it is learned as a LoRA but the prompt has no LoRA tag left for it (tags: "
                f"{listed}; they go to the LoRA subjects in order): add its tag, <lora:name:1>, "
                "to the prompt, or set its personalization to how it was learned",
                k,
                _lora_parameter(k),
            )
        out[k] = free.pop(0)
    return out


def _lora_name(value: str) -> str:
    """A subject's LoRA as the user wrote it: the tag's name, or the whole tag <lora:NAME:0.8>."""
    value = (value or "").strip()
    m = re.fullmatch(r"<\s*lora\s*:([^:>]*)(:[^>]*)?>", value, re.IGNORECASE)
    return (m.group(1) if m else value).strip()


def _find_tag(name: str, tags: Sequence[str]) -> Optional[str]:
    """The tag named `name`: exactly, else the one equal ignoring case."""
    if name in tags:
        return name
    return next((t for t in tags if t.lower() == name.lower()), None)


def _lora_parameter(k: int) -> str:
    return "personalization" if k == 0 else "subjects"
