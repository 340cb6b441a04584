"""The paper's three prompts, derived from what the user typed.

- `y_p`  (personalized): the user's prompt, e.g. ``a sks dog jumping over a fence``.
- `y_p⁻` (layout): `y_p` as a vanilla model can read it: the concept token replaced by the class
  phrase, or removed when the class phrase already follows it (``a sks dog`` → ``a dog``).
- `y_r`  (reference): the neutral prompt for the reference and target paths, by default
  ``a photo of <concept token> <class phrase>``.

Also: where the subject's tokens sit in the text conditioning (for the cross-attention mask), and a
best guess at the concept token so the UI can prefill its fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import LayoutRetouchError

# Words DreamBooth/LoRA tutorials use as the rare identifier of a subject.
RARE_TOKENS = ("sks", "ohwx", "zwx")
# Words after a rare token that are not what it stands for ("a sks on the beach").
_NOT_A_CLASS = frozenset(
    "a an the and or on in at of with by near under over from to is are wearing sitting standing "
    "lying jumping running holding".split()
)

# A1111 extra-network tags: <lora:NAME:0.8>, <lyco:...>, <hypernet:...>. Their text is not prompt
# text, so a concept token inside one is not an occurrence (and must never be rewritten). The one
# rule for them, the WebUI's own (modules/extra_networks.py re_extra_net): the glue strips with it too.
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
# The extra networks that are LoRAs (the WebUI's network names, case as it registers them).
LORA_NETWORKS = ("lora", "lyco")
LORA_TAG_FIX = "add your LoRA's tag, <lora:name:1>, to the prompt"


def strip_extra_networks(prompt: str) -> str:
    """The prompt without its extra-network tags, as the WebUI removes them before encoding."""
    return EXTRA_NETWORK_TAG.sub("", prompt)


def lora_names(prompt: str) -> list[str]:
    """The names of the prompt's LoRA tags, in order: <lora:NAME:0.8> → NAME."""
    return [
        m.group(2).split(":")[0].strip()
        for m in EXTRA_NETWORK_TAG.finditer(prompt)
        if m.group(1) in LORA_NETWORKS
    ]


@dataclass(frozen=True)
class SubjectWords:
    """How the prompt names one subject: its concept token ("" for a subject known from its photos
    only) and its class phrase."""

    concept_token: str
    class_phrase: str

    @property
    def phrases(self) -> list[str]:
        """The words whose conditioning rows are this subject's (its map's tokens)."""
        return [p for p in (self.concept_token, self.class_phrase) if p]

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.concept_token, self.class_phrase) if p)

    def reference_prompt(self) -> str:
        return f"a photo of {self.label}"


@dataclass(frozen=True)
class RetouchPrompts:
    personalized: str  # y_p, the user's prompt
    layout: str  # y_p⁻, for the vanilla model
    reference: str  # y_r, neutral prompt for the reference and target paths (several subjects:
    #                 the target's, naming them all; each subject's photos take its own)
    concept_token: str  # subject 1's
    class_phrase: str
    subjects: tuple = ()  # several subjects (or a photo-only one): subjects.SubjectWords each

    def subject_words(self) -> list:
        """The subjects' words, one subject: its concept token and class phrase."""
        if self.subjects:
            return list(self.subjects)
        return [SubjectWords(self.concept_token, self.class_phrase)]

    def reference_of_subject(self, k: int) -> str:
        """y_r of subject k's reference photos."""
        return self.subjects[k].reference_prompt() if self.subjects else self.reference


def _token_pattern(token: str) -> re.Pattern[str]:
    """Whole-token match, case-insensitive as CLIP is (its tokenizer lowercases the prompt, so
    ``SKS`` and ``sks`` are one token to the model): ``sks`` must not match inside ``asks``.

    A boundary is only required on a side where the token itself starts/ends with a word character
    (``<my-vase>`` brings its own brackets). Emphasis syntax is no word character, so ``(sks:1.2)``
    and ``[sks]`` match.
    """
    left = r"(?<!\w)" if re.match(r"\w", token[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", token[-1]) else ""
    return re.compile(left + re.escape(token) + right, re.IGNORECASE)


def _tag_spans(prompt: str) -> list[tuple[int, int]]:
    return [m.span() for m in EXTRA_NETWORK_TAG.finditer(prompt)]


def _token_matches(prompt: str, token: str) -> list[re.Match[str]]:
    """Every occurrence of the token outside extra-network tags."""
    spans = _tag_spans(prompt)
    return [
        m
        for m in _token_pattern(token).finditer(prompt)
        if not any(a <= m.start() < b for a, b in spans)
    ]


# What derive_prompts (and the parameters' validation) says when the subject is not named.
NO_CONCEPT_TOKEN = (
    "concept_token is empty: enter the word that stands for your subject, e.g. sks or <my-vase>"
)
NO_CLASS_PHRASE = (
    "class_phrase is empty: enter what a normal model calls your subject, e.g. dog or red vase"
)


def derive_prompts(
    prompt: str,
    concept_token: str,
    class_phrase: str,
    reference_prompt: str | None = None,
) -> RetouchPrompts:
    """Build `y_p`, `y_p⁻` and `y_r` from the user's prompt.

    Every occurrence of the concept token is handled on its own: if the class phrase follows it
    (after whitespace, compared case-insensitively), the token and the whitespace after it are
    removed; otherwise the token is replaced by the class phrase. Nothing else in the prompt changes.
    Known limit: ``(sks:1.2) dog`` becomes ``(dog:1.2) dog`` — the class phrase does not follow the
    token directly, so it is replaced.
    """
    prompt = prompt or ""
    token = (concept_token or "").strip()
    if not token:
        raise LayoutRetouchError(NO_CONCEPT_TOKEN, parameter="concept_token")
    matches = _token_matches(prompt, token)
    if not matches:
        raise LayoutRetouchError(
            f"the concept token '{token}' does not appear in the prompt '{prompt}' "
            "(it must be a whole word and the case must match): write it in the prompt where the "
            f"subject goes, e.g. 'a photo of {token} dog', or change the concept token to the word "
            "your prompt uses for the subject",
            parameter="concept_token",
        )
    phrase = " ".join((class_phrase or "").split())
    if not phrase:
        raise LayoutRetouchError(NO_CLASS_PHRASE, parameter="class_phrase")
    return RetouchPrompts(
        personalized=prompt,
        layout=_layout_prompt(prompt, matches, phrase),
        reference=(reference_prompt or "").strip() or f"a photo of {token} {phrase}",
        concept_token=token,
        class_phrase=phrase,
    )


def _layout_prompt(prompt: str, matches: list[re.Match[str]], phrase: str) -> str:
    """y_p⁻: each occurrence of the token dropped where the class phrase follows it, else replaced
    by the class phrase."""
    # The class phrase "follows" when only whitespace separates it from the token; its inner
    # spaces may be any whitespace, and it must end at a word boundary (dog ≠ doghouse).
    follows = re.compile(
        r"\s+" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?!\w)", re.IGNORECASE
    )
    pieces: list[str] = []
    pos = 0
    for m in matches:
        pieces.append(prompt[pos : m.start()])
        after = follows.match(prompt, m.end())
        if after:
            # Drop the token and the whitespace after it: "a sks dog" → "a dog" (no double space).
            gap = re.match(r"\s+", prompt[m.end() :])
            pos = m.end() + (gap.end() if gap else 0)
        else:
            pieces.append(phrase)
            pos = m.end()
    pieces.append(prompt[pos:])
    return "".join(pieces)


def conditioning_position(index: int, chunk_length: int = 75) -> int:
    """Token index (no BOS/EOS) → row in the conditioning tensor.

    A1111/ldm encode the prompt in chunks of `chunk_length` tokens, each wrapped in BOS … EOS
    (77 rows per chunk for SD1), so BOS sits at row 0 of every chunk.
    """
    return (index // chunk_length) * (chunk_length + 2) + index % chunk_length + 1


def subject_token_positions(
    tokenize: Callable[[str], list[int]],
    prompt: str,
    phrases: Sequence[str],
    chunk_length: int = 75,
) -> list[int]:
    """Rows of the conditioning that hold the subject (every occurrence of every phrase).

    `tokenize(text)` returns token ids without BOS/EOS; each phrase is tokenized alone and searched
    as an id sequence in the prompt's ids. Pass the text the model actually encodes (emphasis
    brackets and extra-network tags removed), or the rows shift. Chunks are assumed to be plain
    `chunk_length`-token runs (A1111's optional comma padding is not modelled).
    """
    ids = list(tokenize(prompt))
    found: set[int] = set()
    for phrase in phrases:
        if not phrase or not phrase.strip():
            continue
        pids = list(tokenize(phrase.strip()))
        n = len(pids)
        if n == 0:
            continue
        for i in range(len(ids) - n + 1):
            if ids[i : i + n] == pids:
                found.update(conditioning_position(i + k, chunk_length) for k in range(n))
    if not found:
        wanted = ", ".join(f"'{p}'" for p in phrases if p and p.strip()) or "(none given)"
        raise LayoutRetouchError(
            f"none of the subject words {wanted} appears in the prompt '{prompt}', so the "
            "cross-attention mask has nothing to follow: set the class phrase to a word that is in "
            "the prompt (e.g. dog for 'a sks dog on a beach')",
            parameter="class_phrase",
        )
    return sorted(found)


def guess_concept(prompt: str, known_embeddings: Iterable[str] = ()) -> tuple[str, str] | None:
    """A best guess of (concept token, class phrase) to prefill the UI; None if nothing fits.

    In this order:
    1. a known Textual-Inversion embedding name present in the prompt as a whole token (the one
       that comes first in the prompt) → (name, "");
    2. a rare identifier (sks, ohwx, zwx) → (token, the word after it, or "");
    3. a LoRA tag ``<lora:NAME:…>`` → (NAME, "") — many LoRAs use their name as trigger word.
    Rare tokens come before LoRA tags because a LoRA in the prompt is often a style, while a rare
    identifier always stands for the subject.
    """
    prompt = prompt or ""
    best: tuple[int, str] | None = None
    for name in known_embeddings:
        name = (name or "").strip()
        if not name:
            continue
        matches = _token_matches(prompt, name)
        if matches and (best is None or matches[0].start() < best[0]):
            best = (matches[0].start(), name)
    if best is not None:
        return best[1], ""

    spans = _tag_spans(prompt)
    rare = re.compile(
        r"(?<!\w)(" + "|".join(RARE_TOKENS) + r")(?!\w)(?:[\s\]\)]+([A-Za-z][\w-]*))?"
    )
    for m in rare.finditer(prompt):
        if any(a <= m.start() < b for a, b in spans):
            continue
        following = m.group(2) or ""
        return m.group(1), "" if following.lower() in _NOT_A_CLASS else following

    loras = lora_names(prompt)
    return (loras[0], "") if loras else None


def guess_subjects(
    prompt: str, known_embeddings: Iterable[str] = (), limit: int = 3
) -> list[tuple[str, str]]:
    """Every subject the prompt names, as (concept token, class phrase), at most `limit`: the
    Textual-Inversion embedding names in the prompt (in prompt order), then the rare identifiers
    (sks, ohwx, zwx; each with the word after it), each token once; when there is neither, the LoRA
    tags' names. The first is always `guess_concept`'s, so one subject is guessed as before."""
    prompt = prompt or ""
    embeddings: list[tuple[int, str, str]] = []
    for name in dict.fromkeys((n or "").strip() for n in known_embeddings):
        matches = _token_matches(prompt, name) if name else []
        if matches:
            embeddings.append((matches[0].start(), name, ""))
    spans = _tag_spans(prompt)
    rare = re.compile(
        r"(?<!\w)(" + "|".join(RARE_TOKENS) + r")(?!\w)(?:[\s\]\)]+([A-Za-z][\w-]*))?"
    )
    identifiers: list[tuple[int, str, str]] = []
    for m in rare.finditer(prompt):
        if any(a <= m.start() < b for a, b in spans):
            continue
        following = m.group(2) or ""
        phrase = "" if following.lower() in _NOT_A_CLASS else following
        identifiers.append((m.start(), m.group(1), phrase))
    found: list[tuple[str, str]] = []
    for _, token, phrase in sorted(embeddings) + identifiers:
        if token.lower() not in {t.lower() for t, _ in found}:
            found.append((token, phrase))
    if not found:
        found = [(name, "") for name in dict.fromkeys(lora_names(prompt))]
    return found[:limit]


def subject_positions_in_chunks(
    chunks: Sequence, tokenize: Callable[[str], list[int]], concept_token: str, class_phrase: str
) -> list[int]:
    """Conditioning rows of the subject in A1111's parsed prompt (`tokenize_line` chunks).

    Each chunk has `.tokens` (BOS + 75 + EOS ids; Textual-Inversion vectors are placeholders) and
    `.fixes` (offset, embedding) for embeddings. The subject is: every vector of an embedding named
    like the concept token, and every occurrence of the concept token's or the class phrase's ids.
    Emphasis and extra-network tags are already parsed out, so rows are exact.
    """
    found: set[int] = set()
    phrases = [p.strip() for p in (concept_token, class_phrase) if p and p.strip()]
    wanted = [list(tokenize(p)) for p in phrases]
    for ci, chunk in enumerate(chunks):
        base = ci * len(chunk.tokens)
        for fix in getattr(chunk, "fixes", ()):
            emb = fix.embedding
            if getattr(emb, "name", None) == concept_token:
                found.update(base + 1 + fix.offset + k for k in range(int(emb.vectors)))
        body = list(chunk.tokens[1:-1])
        for ids in wanted:
            n = len(ids)
            for i in range(len(body) - n + 1) if n else ():
                if body[i : i + n] == ids:
                    found.update(base + 1 + i + k for k in range(n))
    if not found:
        raise LayoutRetouchError(
            f"neither the concept token '{concept_token}' nor the class phrase '{class_phrase}' was "
            "found among the prompt's tokens, so the subject mask has nothing to follow: put the "
            "class word in the prompt (e.g. 'a sks dog') or check the spelling of the token",
            parameter="class_phrase",
        )
    return sorted(found)
