"""The several-subjects protocol's runner: ViCo concepts in pairs, one image of both per request.

The groups (usually pairs) come from the concept file:

- its `"pairs"` list, when it has one: each entry names 2 to MAX_SUBJECTS concepts in subject
  order, `["brown_dog", "cat_statue"]`, or is an object `{"subjects": [...], "checkpoint": "...",
  "lambda1": 4, ...}` with the multi-concept checkpoint and script settings of that group;
- else every pair of its concepts, in the file's order (concept i before concept j > i), leaving
  out (with a note) the pairs one image cannot hold: the same class phrase or the same concept
  token (the extension could not tell their regions apart), or two different checkpoints (one image
  is drawn by one model: list such a pair under "pairs" with its multi-concept checkpoint).

The prompts come from ViCo's own lists: a one-subject template "a {} <scene>" becomes
"a {} and a {} <scene>" (three subjects: "a {}, a {} and a {} <scene>"), its "{}" filled with the
subjects' texts in order. A template fits when it starts with "a {} " (no attribute before the
subject, such as "a red {}") and its scene dresses no subject (no SUBJECT_ATTRIBUTE_WORDS, such as
"wearing a red hat", "in a chef outfit"). When the group's concepts use different lists (live and
non-live), the group gets the templates that fit in every one of them, in the first concept's order.

Each request sends the script's `subjects` list (every subject: reference photo, personalization,
concept token, class phrase, LoRA name); "off" sends the same with enabled=False and no photos,
with the same seeds. Images are written as the one-subject runner does, under the group's name
(`images/<method>/<a>+<b>/p<prompt>_s<seed>.png`), with the extension's regions picture of each ON
image beside it (`<image>.regions.png`, see `regions`). Resumable the same way.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from ..errors import LayoutRetouchError
from ..params import SUBJECT_INFOTEXT
from ..subjects import MAX_SUBJECTS
from . import regions as regions_mod
from .runner import (
    PAIRS_KEY,
    SCRIPT_ARG_KEYS,
    SCRIPT_TITLE,
    SUBJECTS_PROTOCOL,
    ConceptSpec,
    RunSettings,
    RunSummary,
    WebUIClient,
    _atomic_write,
    _check_run_file,
    _check_run_settings,
    _clients_for,
    _Job,
    _make_out_dir,
    _parse_info,
    _Sweep,
    image_path,
    load_concepts,
    read_prompts,
    read_reply,
    run_jobs,
    script_settings,
    txt2img_payload,
)

GROUP_JOIN = "+"  # a group's name: its concepts' names joined, "brown_dog+cat_statue"
# Words after "a {}" that dress or describe the subject: such a template would bind to one subject.
SUBJECT_ATTRIBUTE_WORDS = ("wearing", "outfit")
GROUP_ENTRY_KEYS = ("subjects", "checkpoint") + SCRIPT_ARG_KEYS


@dataclass
class GroupSpec:
    """Two (or up to MAX_SUBJECTS) concepts drawn in one image, in subject order."""

    name: str
    concepts: tuple  # of ConceptSpec
    checkpoint: str = ""  # the model that draws them all (a multi-concept DreamBooth checkpoint)
    script: dict = field(default_factory=dict)  # overrides of SCRIPT_ARG_KEYS for this group

    @property
    def prompt_extra(self) -> str:
        """The concepts' prompt_extra (LoRA tags) in subject order, each once."""
        extras = [c.prompt_extra for c in self.concepts if c.prompt_extra]
        return " ".join(dict.fromkeys(extras))

    def to_json(self) -> dict:
        return {
            "concepts": [c.name for c in self.concepts],
            "classes": [c.class_phrase for c in self.concepts],
            "folders": [c.folder for c in self.concepts],
            "checkpoint": self.checkpoint,
            "script": dict(self.script),
        }


# ------------------------------------------------------------------------------------- prompts
def subject_template(template: str, n_subjects: int = 2) -> str | None:
    """ViCo's one-subject template as an n-subject one ("a {} in the snow" → "a {} and a {} in the
    snow"), or None when it does not fit (see the module docstring)."""
    t = " ".join(template.split())
    if not t.startswith("a {} ") or t.count("{}") != 1:
        return None
    scene = t[len("a {} ") :]
    if any(word in SUBJECT_ATTRIBUTE_WORDS for word in scene.lower().split()):
        return None
    names = ["a {}"] * n_subjects
    return f"{', '.join(names[:-1])} and {names[-1]} {scene}"


def fill_template(template: str, phrases: Sequence[str]) -> str:
    """Each "{}" of an n-subject template filled with the next phrase."""
    out = template
    for phrase in phrases:
        out = out.replace("{}", phrase, 1)
    return " ".join(out.split())


def group_templates(vico_dir: str, group: GroupSpec, prompt_set: str = "normal") -> list[str]:
    """The group's n-subject templates: those that fit in every one of its concepts' ViCo lists."""
    n = len(group.concepts)
    lists = [
        [" ".join(t.split()) for t in read_prompts(vico_dir, c.live, prompt_set)]
        for c in group.concepts
    ]
    shared = [t for t in lists[0] if all(t in other for other in lists[1:])]
    templates = [s for s in (subject_template(t, n) for t in shared) if s is not None]
    if not templates:
        kinds = " and ".join(
            f"{c.name} ({'live' if c.live else 'non-live'})" for c in group.concepts
        )
        raise LayoutRetouchError(
            f"No ViCo {prompt_set} prompt fits {kinds} together (a fitting one starts with "
            f"'a {{}} ' and dresses no subject): add such prompts to the lists, or pair other "
            f"concepts.",
            parameter="concepts",
        )
    return list(dict.fromkeys(templates))


# -------------------------------------------------------------------------------------- groups
def load_groups(
    concepts_path: str, concepts: Sequence[ConceptSpec], max_groups: int | None = None
) -> tuple[list[GroupSpec], list[str]]:
    """(the groups of the sweep, notes on the pairs left out); see the module docstring."""
    with open(concepts_path, encoding="utf-8") as f:
        data = json.load(f)
    entries = data.get(PAIRS_KEY) if isinstance(data, dict) else None
    if entries is None:
        groups, notes = _every_pair(concepts)
    else:
        groups, notes = _listed_groups(entries, concepts, concepts_path), []
    if not groups:
        raise LayoutRetouchError(
            f"No two concepts of {concepts_path} can share an image ({'; '.join(notes)}). Give "
            f'each its own concept token and class phrase, or list the pairs under "{PAIRS_KEY}" '
            "with their multi-concept checkpoint.",
            parameter="concepts",
        )
    if max_groups is not None:
        groups = groups[: max(0, int(max_groups))]
    return groups, notes


def _every_pair(concepts: Sequence[ConceptSpec]) -> tuple[list[GroupSpec], list[str]]:
    groups, notes = [], []
    for i, a in enumerate(concepts):
        for b in concepts[i + 1 :]:
            problem = _group_problem((a, b), checkpoint="")
            if problem:
                notes.append(f"{a.name} and {b.name} left out: {problem}")
            else:
                groups.append(_group((a, b), {}))
    return groups, notes


def _listed_groups(entries, concepts: Sequence[ConceptSpec], path: str) -> list[GroupSpec]:
    if not isinstance(entries, list) or not entries:
        raise LayoutRetouchError(
            f'"{PAIRS_KEY}" in {path} must be a list of pairs, e.g. '
            '[["brown_dog", "cat_statue"], {"subjects": ["brown_dog", "red_vase"], '
            '"checkpoint": "multi.safetensors"}].',
            parameter="concepts",
        )
    by_name = {c.name: c for c in concepts}
    groups = []
    for number, entry in enumerate(entries, 1):
        entry = _entry_dict(entry, number, path)
        names = entry["subjects"]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise LayoutRetouchError(
                f"{PAIRS_KEY}[{number}] in {path} names {unknown}, not in the file's concepts "
                f"({', '.join(by_name)}).",
                parameter="concepts",
            )
        members = tuple(by_name[n] for n in names)
        problem = _group_problem(members, str(entry.get("checkpoint", "")))
        if problem:
            raise LayoutRetouchError(
                f"{PAIRS_KEY}[{number}] in {path} ({' + '.join(names)}): {problem}.",
                parameter="concepts",
            )
        groups.append(_group(members, entry))
    return groups


def _entry_dict(entry, number: int, path: str) -> dict:
    """A "pairs" entry as {"subjects": [names], …}; its shape checked."""
    if isinstance(entry, list):
        entry = {"subjects": entry}
    where = f"{PAIRS_KEY}[{number}] in {path}"
    if not isinstance(entry, dict) or not isinstance(entry.get("subjects"), list):
        raise LayoutRetouchError(
            f'{where} must be a list of concept names or an object with "subjects".',
            parameter="concepts",
        )
    unknown = sorted(set(entry) - set(GROUP_ENTRY_KEYS))
    if unknown:
        raise LayoutRetouchError(
            f"{where}: unknown key(s) {unknown}; known: {', '.join(GROUP_ENTRY_KEYS)}.",
            parameter="concepts",
        )
    names = [str(n) for n in entry["subjects"]]
    if not 2 <= len(names) <= MAX_SUBJECTS or len(set(names)) != len(names):
        raise LayoutRetouchError(
            f"{where} names {names}: give 2 to {MAX_SUBJECTS} different concepts.",
            parameter="concepts",
        )
    return {**entry, "subjects": names}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _group_problem(concepts: Sequence[ConceptSpec], checkpoint: str) -> str:
    """Why these concepts cannot share one image ("" when they can)."""
    for k, c in enumerate(concepts):
        for other in concepts[:k]:
            if _norm(c.class_phrase) == _norm(other.class_phrase):
                return (
                    f"both have the class phrase '{c.class_phrase}' (name them apart, e.g. "
                    "'white dog' and 'brown dog')"
                )
            if c.token and _norm(c.token) == _norm(other.token):
                return f"both have the concept token '{c.token}' (each subject needs its own)"
    ckpts = sorted({c.checkpoint for c in concepts if c.checkpoint})
    if len(ckpts) > 1 and not checkpoint:
        return (
            f"they name different checkpoints ({', '.join(ckpts)}) and one image is drawn by "
            f'one model: list the pair under "{PAIRS_KEY}" with its multi-concept checkpoint'
        )
    return ""


def _group(concepts: Sequence[ConceptSpec], entry: dict) -> GroupSpec:
    ckpts = [c.checkpoint for c in concepts if c.checkpoint]
    script = {}
    for key in SCRIPT_ARG_KEYS:  # the entry's own, else the first concept's that sets it
        given = [c.script[key] for c in concepts if key in c.script]
        if key in entry or given:
            script[key] = entry.get(key, given[0] if given else None)
    return GroupSpec(
        name=GROUP_JOIN.join(c.name for c in concepts),
        concepts=tuple(concepts),
        checkpoint=str(entry.get("checkpoint") or (ckpts[0] if ckpts else "")),
        script=script,
    )


# ------------------------------------------------------------------------------------- requests
def build_subjects_payload(
    group: GroupSpec,
    template: str,
    seed: int,
    method: str,
    settings: RunSettings,
    refs: dict,
    include_script: bool = True,
) -> dict:
    """The /sdapi/v1/txt2img request for one image of the group: the script's `subjects` list is
    every subject (`refs`: concept name → reference photo, base64)."""
    prompt = fill_template(template, [c.subject for c in group.concepts])
    if group.prompt_extra:
        prompt = f"{prompt} {group.prompt_extra}"
    enabled = method == "on"
    subjects = [
        {
            "reference_image": refs.get(c.name, "") if enabled else "",
            "personalization": c.personalization,
            "concept_token": c.token,
            "class_phrase": c.class_phrase,
            "lora": c.lora,
        }
        for c in group.concepts
    ]
    script = {"enabled": enabled, "subjects": subjects}
    script.update(script_settings(group.script, settings, enabled))
    return txt2img_payload(
        prompt, seed, settings, group.checkpoint, script if include_script or enabled else None
    )


def regions_picture(reply: dict, payload: dict) -> bytes | None:
    """The regions picture of a one-image ON reply as PNG bytes (snapped to the palette), or None
    when the reply has none (no intermediates asked for or sent)."""
    args = payload.get("alwayson_scripts", {}).get(SCRIPT_TITLE, {}).get("args") or [{}]
    if not (args[0].get("enabled") and args[0].get("show_intermediates")):
        return None
    images = []
    for b64 in reply.get("images") or []:
        try:
            raw = base64.b64decode(str(b64).split(",", 1)[-1])
            with Image.open(io.BytesIO(raw)) as im:
                images.append(im.convert("RGB"))
        except (ValueError, OSError):
            images.append(Image.new("RGB", (1, 1), (255, 255, 255)))  # never a regions picture
    infotexts = _parse_info(reply).get("infotexts") or []
    found = regions_mod.find_regions_picture(images, infotexts)
    if found is None:
        return None
    buf = io.BytesIO()
    regions_mod.snap_to_palette(images[found]).save(buf, format="PNG")
    return buf.getvalue()


class _SubjectsSweep(_Sweep):
    """The one-subject sweep's workers, making one image of a group per request."""

    def one(self, server, job) -> None:
        group, settings = job.spec, self.settings
        payload = build_subjects_payload(
            group,
            job.template,
            job.seed,
            job.method,
            settings,
            self.refs,
            include_script=server.has_script,
        )
        reply = server.client.txt2img(payload)
        data, info, infotext = read_reply(reply)
        script_ran = self._check_script_ran(server, job, infotext)
        if script_ran:
            self._check_every_subject(server, job, infotext)
        path = image_path(self.out_dir, job.method, group.name, job.prompt_index, job.seed)
        regions = regions_picture(reply, payload)
        concepts = group.concepts
        sidecar = {
            "group": group.name,
            "method": job.method,
            "prompt_index": job.prompt_index,
            "template": job.template,
            "prompt": payload["prompt"],
            "seed": job.seed,
            "concepts": [c.name for c in concepts],
            "classes": [c.class_phrase for c in concepts],
            "tokens": [c.token for c in concepts],
            "subjects": [c.subject for c in concepts],
            "folders": [c.folder for c in concepts],
            "info_seed": info.get("seed"),
            "infotext": infotext,
            "script_ran": script_ran,
            "regions_picture": regions is not None,
            "extra_images": max(0, len(reply["images"]) - 1),
            "size": list(Image.open(io.BytesIO(data)).size),
            "webui": server.client.url,
        }
        _atomic_write(
            os.path.splitext(path)[0] + ".json", json.dumps(sidecar, indent=1).encode("utf-8")
        )
        if regions is not None:
            _atomic_write(regions_mod.regions_path_for(path), regions)
        _atomic_write(path, data)  # last: the image's presence is what "done" means

    def _check_every_subject(self, server, job, infotext: str) -> None:
        """An ON infotext names every subject after the first ("LR subject 2 …"): otherwise the
        extension took one subject only and the image is no several-subjects image."""
        n = len(job.spec.concepts)
        missing = [
            k
            for k in range(2, n + 1)
            if SUBJECT_INFOTEXT.format(number=k, what="").strip().lower() not in infotext.lower()
        ]
        if not missing:
            return
        s = self.summary
        raise LayoutRetouchError(
            f"{self.webui(server)} answered {job.describe()} with an image whose infotext names "
            f"no subject {', '.join(map(str, missing))}: the extension took one subject only "
            f"(an extension without several subjects?). That image was not saved; "
            f"{s.skipped + s.generated} of {s.total} are in {self.out_dir}. Update the "
            f"extension, restart the WebUI and run again.",
            parameter="url",
        )


def _plan_group_jobs(groups: Sequence[GroupSpec], vico_dir: str, settings: RunSettings) -> list:
    """Every request of the sweep: group, prompt, seed, then method (a pair of methods together)."""
    jobs: list[_Job] = []
    for group in groups:
        templates = group_templates(vico_dir, group, settings.prompt_set)
        if settings.n_prompts is not None:
            templates = templates[: max(0, int(settings.n_prompts))]
        for pi, template in enumerate(templates):
            for k in range(settings.n):
                for method in settings.methods:
                    jobs.append(_Job(len(jobs), group, pi, template, settings.seed + k, method))
    return jobs


def run_subjects_protocol(
    vico_dir: str,
    concepts_path: str,
    url: str | Sequence[str],
    out_dir: str,
    settings: RunSettings | None = None,
    client: WebUIClient | Sequence[WebUIClient] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    per_server: int = 1,
    max_groups: int | None = None,
) -> RunSummary:
    """Generate every missing image of the several-subjects sweep (`max_groups`: the first N
    groups only); WebUIs, retries, resuming and messages as `runner.run_protocol`."""
    from tqdm import tqdm

    settings = settings or RunSettings()
    _check_run_settings(settings, per_server)
    clients = _clients_for(url, client)
    concepts = load_concepts(concepts_path, vico_dir)
    groups, notes = load_groups(concepts_path, concepts, max_groups)
    say = log or (lambda msg: tqdm.write(msg))
    for note in notes:
        say(f"note: {note}")
    vico_dir = os.path.abspath(vico_dir)
    out_dir = _make_out_dir(out_dir)
    jobs = _plan_group_jobs(groups, vico_dir, settings)
    urls = [c.url for c in clients]
    summary = run_jobs(
        jobs,
        out_dir,
        settings,
        clients,
        lambda: _check_run_file(
            out_dir, settings, concepts, vico_dir, urls, SUBJECTS_PROTOCOL, groups
        ),
        progress=progress,
        log=say,
        per_server=per_server,
        sweep_class=_SubjectsSweep,
    )
    summary.warnings.extend(notes)
    return summary
