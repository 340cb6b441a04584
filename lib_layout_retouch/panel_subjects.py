"""The WebUI panel's subjects 2 … ↔ the `subjects` parameter, host-free so the library tests it.

Subject 1 is the panel's own controls (the flat fields); subjects 2 … MAX_SUBJECTS each have a
panel of their own (photos, how it was learned, concept token, class phrase, LoRA name), shown
one by one with *Add subject*. The script's `subjects` argument is the list of the shown ones as
the dicts `params.SUBJECT_KEYS` names, so the UI, the API and the positional args read alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .params import (
    _SUBJECT_INFOTEXT_WHAT,
    FIELD_BY_NAME,
    MAX_SUBJECTS,
    SUBJECT_INFOTEXT,
    SubjectParams,
)

_KIND = FIELD_BY_NAME["personalization"]
KIND_LABELS: dict[str, str] = dict(zip(_KIND.choices, _KIND.choice_labels))
# A new subject's "how it was learned": the API's default for a subject after the first.
DEFAULT_KIND: str = SubjectParams().personalization
# The controls of one subject's panel after its photos, in the order the panel passes them.
ROW_KEYS = ("personalization", "concept_token", "class_phrase", "lora")


def kind_value(shown: Any) -> str:
    """A personalization radio's value (its label, or already the API value) → the API value."""
    text = str(shown or "")
    for value, label in KIND_LABELS.items():
        if text in (value, label):
            return value
    return text  # unknown: the parameters' check names it


@dataclass
class SubjectRow:
    """What one subject's panel holds: its photos (images, in order), and the texts as shown."""

    photos: Sequence[Any] = field(default_factory=list)
    personalization: str = DEFAULT_KIND
    concept_token: str = ""
    class_phrase: str = ""
    lora: str = ""

    def to_dict(self) -> dict:
        photos = [p for p in self.photos if p is not None]
        return {
            "reference_image": (photos[0] if len(photos) == 1 else photos) if photos else None,
            "personalization": kind_value(self.personalization),
            "concept_token": (self.concept_token or "").strip(),
            "class_phrase": (self.class_phrase or "").strip(),
            "lora": (self.lora or "").strip(),
        }


def shown_count(count: Any) -> int:
    """How many subjects the panel shows (1 … MAX_SUBJECTS) from its hidden counter's value."""
    try:
        n = int(float(count))
    except (TypeError, ValueError):
        return 1
    return min(max(n, 1), MAX_SUBJECTS)


def subjects_value(count: Any, rows: Sequence[SubjectRow]) -> list[dict]:
    """The script's `subjects` argument: subjects 2 … `count` (the panels shown) as dicts."""
    return [row.to_dict() for row in list(rows)[: shown_count(count) - 1]]


def removed(rows: Sequence[SubjectRow], index: int) -> list[SubjectRow]:
    """`rows` without row `index` (0-based among subjects 2 …): the ones after it move up, the
    last panel is emptied."""
    rows = list(rows)
    return rows[:index] + rows[index + 1 :] + [SubjectRow()]


@dataclass
class PastedSubject:
    """Subject k of a pasted infotext as the panel shows it: the texts, and the fingerprints of
    the photos it was made with (no image stores the photos)."""

    personalization: str
    concept_token: str
    class_phrase: str
    lora: str
    fingerprints: list[str]


def pasted_subjects(values: Mapping[str, Any]) -> list[PastedSubject]:
    """`LayoutRetouchParams.from_infotext`'s "subjects" → one PastedSubject per subject after the
    first; [] when the infotext had no Layout-and-Retouch keys or one subject."""
    out = []
    for subject in list(values.get("subjects") or ())[: MAX_SUBJECTS - 1]:
        kind = subject.get("personalization", DEFAULT_KIND)
        out.append(
            PastedSubject(
                KIND_LABELS.get(kind, kind),
                subject.get("concept_token", ""),
                subject.get("class_phrase", ""),
                subject.get("lora", ""),
                list(subject.get("reference_fingerprints", [])),
            )
        )
    return out


def paste_keys() -> list[str]:
    """The infotext keys of subjects 2 … ("LR subject 2 concept token" …): the panel pastes them."""
    return [
        SUBJECT_INFOTEXT.format(number=n, what=what)
        for n in range(2, MAX_SUBJECTS + 1)
        for what in _SUBJECT_INFOTEXT_WHAT.values()
    ]


def guessed_count(count: Any, found: Sequence) -> int:
    """The panels shown after *Guess* found `found` subjects: at least as many as it found."""
    return max(shown_count(count), min(len(found), MAX_SUBJECTS))
