"""Several subjects in ComfyUI: what a Layout-and-Retouch Subject node hands on (its photos, how it
was learned, its words, its LoRA), the chain of them, and the library's subjects of a run
(docs/comfyui.md, "Several subjects"; docs/ALGORITHM.md, "Several subjects").

The Sampler's (or the Retouch node's) own `reference`, `concept_token` and `class_phrase` are
subject 1 when its `reference` is connected, and the chained Subject nodes the subjects after it;
with `reference` unconnected the chain is every subject (its first node is subject 1) — the API's
rule for `subjects` (`params._subject_one_from_list`). No ComfyUI import: the LoRA is loaded by the
node (glue) and handed in as a state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import PERSONALIZATION_KINDS, PHOTO_ONLY, SubjectParams
from lib_layout_retouch.prompts import SubjectWords
from lib_layout_retouch.subjects import MAX_SUBJECTS

NO_LORA = "None"  # the lora_name choice for a subject without a LoRA file
LORA = "lora"


@dataclass(frozen=True)
class Subject:
    """One Subject node's output entry. `reference`: its IMAGE (a batch = several photos);
    `lora`: the LoRA's state dict (None: no LoRA file), applied at `lora_strength` in its region."""

    reference: Any
    personalization: str
    concept_token: str
    class_phrase: str
    lora_name: str = NO_LORA
    lora: Optional[dict] = None
    lora_strength: float = 1.0

    @property
    def words(self) -> SubjectWords:
        """How the prompt names it (photo only: its class phrase alone)."""
        token = "" if self.personalization == PHOTO_ONLY else self.concept_token
        return SubjectWords(token, self.class_phrase)

    def params(self, photos) -> SubjectParams:
        """The library's subject with its photos (PIL images)."""
        return SubjectParams(
            reference_image=list(photos) or None,
            personalization=self.personalization,
            concept_token=self.words.concept_token,
            class_phrase=self.class_phrase,
            lora="" if self.lora is None else self.lora_name,
        )


def check_subject(personalization: str, concept_token: str, lora_name: str) -> None:
    """What a Subject node refuses before anything loads: a LoRA subject without its file, a file
    on a subject learned otherwise, a trained subject without its concept token."""
    if personalization not in PERSONALIZATION_KINDS:
        raise LayoutRetouchError(
            f"personalization '{personalization}' is not one of "
            + ", ".join(f"'{k}'" for k in PERSONALIZATION_KINDS),
            parameter="personalization",
        )
    has_lora = bool(lora_name) and lora_name != NO_LORA
    if personalization == LORA and not has_lora:
        raise LayoutRetouchError(
            "personalization 'lora' needs the subject's LoRA: choose its file in 'lora_name' (it "
            "acts only in this subject's region), or choose the personalization it was learned by",
            parameter="lora_name",
        )
    if has_lora and personalization != LORA:
        raise LayoutRetouchError(
            f"lora_name '{lora_name}' is set but personalization is '{personalization}': choose "
            f"personalization 'lora', or lora_name '{NO_LORA}'",
            parameter="lora_name",
        )
    if personalization != PHOTO_ONLY and not (concept_token or "").strip():
        raise LayoutRetouchError(
            f"personalization '{personalization}' needs the concept token the subject was learned "
            "with (e.g. sks); a subject with no trained model takes personalization 'photo'",
            parameter="concept_token",
        )


def chained(previous: Optional[Sequence[Subject]], subject: Subject) -> tuple[Subject, ...]:
    """The chain with `subject` after the `previous` nodes' (refused past MAX_SUBJECTS)."""
    chain = (*(previous or ()), subject)
    if len(chain) > MAX_SUBJECTS:
        raise LayoutRetouchError(
            f"{len(chain)} subjects are chained; at most {MAX_SUBJECTS} are supported: remove "
            f"{len(chain) - MAX_SUBJECTS} Subject node(s)",
            parameter="subjects",
        )
    return chain


def run_subjects(own: Optional[Subject], chain: Optional[Sequence[Subject]]) -> list[Subject]:
    """Every subject of a run: the node's own (`own`, None when its `reference` is unconnected)
    first, then the chain; refused when there is none."""
    subjects = ([own] if own is not None else []) + list(chain or ())
    if not subjects:
        raise LayoutRetouchError(
            "no subject: connect your subject's photo(s) to 'reference', or chain "
            "Layout-and-Retouch Subject nodes into 'subjects'",
            parameter="reference",
        )
    return subjects
