"""Score a several-subjects run folder: each subject's identity inside its own region, the
identity-collapse rate and the whole image's text alignment.

Per image and subject (a "region"), from the subject's region (`regions`: the extension's regions
picture, else SAM prompted with the subject's class phrase):

- I_DINO / I_CLIP (region): the mean cosine between the region's crop and every photo of that
  subject's own concept folder (DINO ViT-S/16, CLIP ViT-B/32; Personalize Anything's SegCLIP-I
  idea: identity measured on the subject's segment, not the whole image);
- DINO_other: the same DINO similarity to the other subject's photos (the highest over the others
  with three subjects);
- collapsed: DINO_other > I_DINO (`is_collapsed`): the region looks more like the other subject.

Averaging: I_DINO / I_CLIP / DINO_other per (subject, prompt) over its found regions, then over
prompts, then over the pair's subjects, then over pairs (DreamMatcher's order). Rates are pooled
counts: collapse rate = collapsed / measured regions, missing rate = regions without the subject /
regions with a source. T_CLIP: the whole image against the prompt with the class phrases
("class") or the template verbatim ("keep"), per prompt, then over prompts and pairs.

Writes results_subjects.csv (per method), results_subjects_per_pair.csv,
results_subjects_per_subject.csv, results_subjects_per_region.csv (every image × subject),
results_subjects.md (the table and how it was made) and results_subjects.json (all of it).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import LayoutRetouchError
from . import regions as regions_mod
from .metrics import DEFAULT_TCLIP_MODE, TCLIP_MODES, fmt, mean_cosine, nanmean
from .runner import METHOD_LABELS, SUBJECTS_PROTOCOL, read_run_file, run_protocol_of
from .scoring import (
    Scorers,
    _generated_images,
    _method_order,
    _rank,
    _write_csv,
    embed_reference_folders,
    pair_records,
    reference_folder,
)
from .subjects_runner import fill_template

SUBJECT_TABLE_COLUMNS = (
    "I_DINO_region",
    "I_CLIP_region",
    "T_CLIP",
    "collapse_rate",
    "missing_rate",
)
SUBJECT_TABLE_HEADERS = {
    "I_DINO_region": "I_DINO (region)",
    "I_CLIP_region": "I_CLIP (region)",
    "collapse_rate": "collapse rate",
    "missing_rate": "missing rate",
}
_COUNTS = ("regions", "found", "measured", "collapsed")
_MEANS = ("I_DINO_region", "I_CLIP_region", "DINO_other")


@dataclass
class GroupRecord:
    path: str
    method: str
    group: str  # "brown_dog+cat_statue"
    prompt_index: int
    template: str  # with one "{}" per subject
    seed: int | None
    concepts: list
    classes: list
    folders: list  # each subject's reference photos

    @property
    def concept(self) -> str:  # what scoring.pair_records matches on
        return self.group


@dataclass
class SubjectScoreOptions:
    tclip_mode: str = DEFAULT_TCLIP_MODE
    regions: str = regions_mod.DEFAULT_REGION_SOURCE
    crop: str = regions_mod.DEFAULT_CROP_MODE
    paired: bool = True


@dataclass
class SubjectsReport:
    rows: list  # per method
    per_group: list
    per_subject: list
    per_region: list
    notes: list
    options: SubjectScoreOptions
    files: dict = field(default_factory=dict)


def is_collapsed(own: float, others: Sequence[float]) -> bool | None:
    """The identity-collapse rule: a region is collapsed when its DINO similarity to another
    subject's references is higher than to its own. None when it cannot be measured."""
    values = [own, *others]
    if not others or not all(v is not None and math.isfinite(v) for v in values):
        return None
    return max(others) > own


# --------------------------------------------------------------------------------------- records
def is_subjects_run(out_dir: str) -> bool:
    return run_protocol_of(read_run_file(out_dir)) == SUBJECTS_PROTOCOL


def collect_group_records(
    out_dir: str, vico_dir: str | None = None
) -> tuple[list[GroupRecord], list[str]]:
    """Every generated image of a several-subjects run with its sidecar: (records, warnings)."""
    images_dir = os.path.join(out_dir, "images")
    if not os.path.isdir(images_dir):
        raise LayoutRetouchError(
            f"{images_dir} does not exist: --out must be a folder written by `run --subjects`.",
            parameter="out",
        )
    run = read_run_file(out_dir)
    vico = vico_dir or run.get("vico")
    records, warnings = [], []
    for method, group, path in _generated_images(images_dir):
        record = _group_record(path, method, group, vico, vico_dir, warnings)
        if record is not None:
            records.append(record)
    if not records:
        raise LayoutRetouchError(f"No scorable images under {images_dir}.", parameter="out")
    return records, warnings


def _group_record(path, method, group, vico, vico_dir, warnings) -> GroupRecord | None:
    side = os.path.splitext(path)[0] + ".json"
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        warnings.append(f"skipped {path}: no readable sidecar {os.path.basename(side)} ({e})")
        return None
    concepts, classes = meta.get("concepts") or [], meta.get("classes") or []
    if "template" not in meta or len(concepts) < 2 or len(classes) != len(concepts):
        warnings.append(f"skipped {path}: its sidecar lacks 'template', 'concepts' or 'classes'")
        return None
    folders = meta.get("folders") or [None] * len(concepts)
    return GroupRecord(
        path=path,
        method=method,
        group=group,
        prompt_index=int(meta.get("prompt_index", -1)),
        template=meta["template"],
        seed=meta.get("seed"),
        concepts=list(concepts),
        classes=list(classes),
        folders=[reference_folder(f, c, vico, vico_dir) for f, c in zip(folders, concepts)],
    )


# ---------------------------------------------------------------------------------------- scoring
def _check_options(options: SubjectScoreOptions, scorers: Scorers) -> None:
    for value, allowed, name in (
        (options.tclip_mode, TCLIP_MODES, "tclip_mode"),
        (options.regions, regions_mod.REGION_SOURCES, "regions"),
        (options.crop, regions_mod.CROP_MODES, "region_crop"),
    ):
        if value not in allowed:
            raise LayoutRetouchError(
                f"Unknown {name} '{value}'; use one of {allowed}.", parameter=name
            )
    if options.regions == "sam" and scorers.sam is None:
        raise LayoutRetouchError(
            "--regions sam segments every image with SAM: pass --sam <SAM checkpoint>.",
            parameter="regions",
        )


def score_subjects_run(
    out_dir: str,
    scorers: Scorers,
    options: SubjectScoreOptions | None = None,
    vico_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SubjectsReport:
    """Score every image of a several-subjects run folder (see the module docstring)."""
    from tqdm import tqdm

    options = options or SubjectScoreOptions()
    _check_options(options, scorers)
    say = log or (lambda m: tqdm.write(m))
    out_dir = os.path.abspath(out_dir)
    records, warnings = collect_group_records(out_dir, vico_dir)
    notes: list[str] = []
    if options.paired and len({r.method for r in records}) > 1:
        records, dropped = pair_records(records)
        if dropped:
            notes.append(
                f"{dropped} image(s) without a counterpart in every method were left out (paired "
                "scoring; finish the run or pass --unpaired)."
            )
    for w in warnings:
        say(w)
    refs = embed_reference_folders({f for r in records for f in r.folders}, scorers)
    tally = _Tally(refs=refs)
    groups: dict[tuple[str, str], list[GroupRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, r.group)].append(r)
    bar = tqdm(total=len(records), desc="scoring", unit="img", disable=not progress)
    for (method, group), recs in sorted(groups.items(), key=lambda kv: (_rank(kv[0][0]), kv[0][1])):
        _score_group(method, group, recs, scorers, options, tally, bar)
    bar.close()
    notes.extend(_notes(tally, scorers))
    return SubjectsReport(
        rows=_method_rows(tally.per_group, options),
        per_group=tally.per_group,
        per_subject=tally.per_subject,
        per_region=tally.per_region,
        notes=notes,
        options=options,
    )


@dataclass
class _Tally:
    refs: dict  # reference folder -> {"dino": …, "clip": …}
    text_cache: dict = field(default_factory=dict)
    per_region: list = field(default_factory=list)
    per_subject: list = field(default_factory=list)
    per_group: list = field(default_factory=list)
    sources: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    unreadable: list = field(default_factory=list)


def _score_group(method, group, recs, scorers, options, tally, bar) -> None:
    """One (method, pair): its region rows, its subject rows and its pair row."""
    from .models import load_image

    recs = sorted(recs, key=lambda r: (r.prompt_index, r.seed if r.seed is not None else -1))
    images, kept = [], []
    for r in recs:
        try:
            images.append(load_image(r.path))
            kept.append(r)
        except LayoutRetouchError as e:
            tally.unreadable.append(str(e))
        bar.update(1)
    if not kept:
        return
    regions = _region_rows(method, group, kept, images, scorers, options, tally)
    tally.per_region.extend(regions)
    subjects = [
        _subject_row(method, group, k, kept[0].concepts[k], [g for g in regions if g["k"] == k])
        for k in range(len(kept[0].concepts))
    ]
    tally.per_subject.extend(subjects)
    row = {"method": method, "pair": group, "images": len(kept)}
    row.update(_pooled(subjects))
    row.update(_tclip(kept, images, scorers, tally))
    tally.per_group.append(row)


def _region_rows(method, group, kept, images, scorers, options, tally) -> list[dict]:
    """One row per image and subject: its region's source, area and similarities."""
    rows, crops = [], []
    for r, img in zip(kept, images):
        masks, source = regions_mod.image_regions(
            r.path, img, r.classes, scorers.sam, options.regions
        )
        tally.sources[method][source] += len(masks)
        for k, mask in enumerate(masks):
            rows.append(_region_row(method, group, r, k, source, mask))
            crops.append(
                regions_mod.region_crop(img, mask, options.crop) if mask is not None else None
            )
    found = [i for i, c in enumerate(crops) if c is not None]
    embedded = {
        name: (dict(zip(found, model.embed_images([crops[i] for i in found]))) if found else {})
        for name, model in (("dino", scorers.dino), ("clip", scorers.clip))
        if model is not None
    }
    for i in found:
        _similarities(rows[i], embedded, i, tally)
    return rows


def _region_row(method, group, record, k, source, mask) -> dict:
    area = float(mask.mean()) if mask is not None else 0.0
    return {
        "method": method,
        "pair": group,
        "prompt_index": record.prompt_index,
        "template": record.template,
        "seed": record.seed,
        "k": k,
        "subject": k + 1,
        "concept": record.concepts[k],
        "folders": record.folders,
        "source": source,
        "found": int(mask is not None),
        "area": area,
        "I_DINO": float("nan"),
        "I_CLIP": float("nan"),
        "DINO_other": float("nan"),
        "collapsed": "",
        "path": record.path,
    }


def _similarities(row: dict, embedded: dict, i: int, tally: _Tally) -> None:
    """A found region's similarity to its own subject's photos and (DINO) to the others'."""
    folders, k = row["folders"], row["k"]
    if "clip" in embedded:
        row["I_CLIP"] = mean_cosine(tally.refs[folders[k]]["clip"], embedded["clip"][i])
    if "dino" not in embedded:
        return
    emb = embedded["dino"][i]
    row["I_DINO"] = mean_cosine(tally.refs[folders[k]]["dino"], emb)
    others = [mean_cosine(tally.refs[f]["dino"], emb) for j, f in enumerate(folders) if j != k]
    row["DINO_other"] = max(others) if others else float("nan")
    collapsed = is_collapsed(row["I_DINO"], others)
    row["collapsed"] = "" if collapsed is None else int(collapsed)


def _subject_row(method, group, k, concept, regions: list[dict]) -> dict:
    """One subject of a pair: means per prompt over found regions, then over prompts; counts."""
    row = {"method": method, "pair": group, "subject": k + 1, "concept": concept}
    row["images"] = len(regions)
    row["regions"] = sum(g["source"] != "none" for g in regions)
    row["found"] = sum(g["found"] for g in regions)
    row["measured"] = sum(g["collapsed"] != "" for g in regions)
    row["collapsed"] = sum(g["collapsed"] == 1 for g in regions)
    by_prompt = defaultdict(list)
    for g in regions:
        if g["found"]:
            by_prompt[g["prompt_index"]].append(g)
    for col, src in (
        ("I_DINO_region", "I_DINO"),
        ("I_CLIP_region", "I_CLIP"),
        ("DINO_other", "DINO_other"),
    ):
        row[col] = nanmean([nanmean([g[src] for g in gs]) for gs in by_prompt.values()])
    row["collapse_rate"] = _rate(row["collapsed"], row["measured"])
    row["missing_rate"] = _rate(row["regions"] - row["found"], row["regions"])
    return row


def _rate(count: int, total: int) -> float:
    return count / total if total else float("nan")


def _pooled(rows: list[dict]) -> dict:
    """Counts summed, means averaged (NaN-aware), rates from the summed counts."""
    out = {c: sum(r[c] for r in rows) for c in _COUNTS}
    out.update({c: nanmean([r[c] for r in rows]) for c in _MEANS})
    out["collapse_rate"] = _rate(out["collapsed"], out["measured"])
    out["missing_rate"] = _rate(out["regions"] - out["found"], out["regions"])
    return out


def _tclip(kept, images, scorers, tally) -> dict:
    """T_CLIP of the whole images in both text modes: per prompt, then the mean over prompts."""
    out = {"prompts": len({r.prompt_index for r in kept})}
    if scorers.clip is None:
        return {**out, **{f"T_CLIP_{m}": float("nan") for m in TCLIP_MODES}}
    emb = scorers.clip.embed_images(images)
    by_prompt = defaultdict(list)
    for i, r in enumerate(kept):
        by_prompt[(r.prompt_index, r.template)].append(i)
    for mode in TCLIP_MODES:
        per_prompt = []
        for (_pi, template), idx in sorted(by_prompt.items()):
            text = template if mode == "keep" else fill_template(template, kept[idx[0]].classes)
            if text not in tally.text_cache:
                tally.text_cache[text] = scorers.clip.embed_texts([text])
            per_prompt.append(mean_cosine(tally.text_cache[text], emb[idx]))
        out[f"T_CLIP_{mode}"] = nanmean(per_prompt)
    return out


def _method_rows(per_group: list[dict], options: SubjectScoreOptions) -> list[dict]:
    rows = []
    for method in _method_order({g["method"] for g in per_group}):
        gs = [g for g in per_group if g["method"] == method]
        row = {"method": method, "label": METHOD_LABELS.get(method, method)}
        row.update({"images": sum(g["images"] for g in gs), "pairs": len(gs)})
        row.update(_pooled(gs))
        for mode in TCLIP_MODES:
            row[f"T_CLIP_{mode}"] = nanmean([g[f"T_CLIP_{mode}"] for g in gs])
        row["T_CLIP"] = row[f"T_CLIP_{options.tclip_mode}"]
        rows.append(row)
    return rows


def _notes(tally: _Tally, scorers: Scorers) -> list[str]:
    notes = []
    words = {"picture": "regions picture", "sam": "SAM", "none": "no region source"}
    for method, counts in sorted(tally.sources.items(), key=lambda kv: _rank(kv[0])):
        said = ", ".join(f"{n} {words.get(s, s)}" for s, n in sorted(counts.items()))
        notes.append(f"Regions of {METHOD_LABELS.get(method, method)}: {said}.")
        if counts.get("none") and len(counts) == 1:
            notes.append(
                f"{METHOD_LABELS.get(method, method)}: no regions (no <image>.regions.png and no "
                "--sam), so its identity and collapse are n/a: pass --sam <SAM checkpoint>."
            )
    used = {m: {s for s in c if s != "none"} for m, c in tally.sources.items()}
    if len({frozenset(s) for s in used.values() if s}) > 1:
        notes.append(
            "The methods' regions come from different sources: for the same measurement on "
            "every method pass --regions sam (with --sam)."
        )
    if scorers.dino is None:
        notes.append("Collapse rate n/a: it compares DINO similarities (--dino none).")
    if tally.unreadable:
        notes.append(
            f"{len(tally.unreadable)} unreadable image(s) were skipped: "
            + "; ".join(tally.unreadable[:3])
        )
    notes.extend(f"{k} n/a: {v}" for k, v in scorers.reasons.items())
    return notes


# ---------------------------------------------------------------------------------------- writing
SUBJECT_RESULT_COLUMNS = ("method", "label", "images", "pairs", "regions", "found", "measured",
    "collapsed", "I_DINO_region", "I_CLIP_region", "DINO_other", "T_CLIP", "T_CLIP_class",
    "T_CLIP_keep", "collapse_rate", "missing_rate")  # fmt: skip
PER_PAIR_COLUMNS = ("method", "pair", "images", "prompts", "regions", "found", "measured",
    "collapsed", "I_DINO_region", "I_CLIP_region", "DINO_other", "T_CLIP_class", "T_CLIP_keep",
    "collapse_rate", "missing_rate")  # fmt: skip
PER_SUBJECT_COLUMNS = ("method", "pair", "subject", "concept", "images", "regions", "found",
    "measured", "collapsed", "I_DINO_region", "I_CLIP_region", "DINO_other", "collapse_rate",
    "missing_rate")  # fmt: skip
PER_REGION_COLUMNS = ("method", "pair", "prompt_index", "template", "seed", "subject", "concept",
    "source", "found", "area", "I_DINO", "I_CLIP", "DINO_other", "collapsed", "path")  # fmt: skip


def subjects_markdown_table(rows: list[dict]) -> str:
    heads = [SUBJECT_TABLE_HEADERS.get(c, c) for c in SUBJECT_TABLE_COLUMNS]
    lines = ["| method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for r in rows:
        lines.append(
            f"| {r['label']} | " + " | ".join(fmt(r[c]) for c in SUBJECT_TABLE_COLUMNS) + " |"
        )
    return "\n".join(lines)


def describe_subjects(report: SubjectsReport, scorers: Scorers) -> list[str]:
    """The notes under the table: how every number was made."""
    o = report.options
    lines = []
    if scorers.random_weights:
        lines.append(
            "**RANDOM WEIGHTS** (--random-models): these numbers only show that the plumbing works."
        )
    lines.append(
        "Images per method: "
        + ", ".join(f"{r['label']} {r['images']} over {r['pairs']} pair(s)" for r in report.rows)
        + "."
    )
    crop = "grey outside the region" if o.crop == "masked" else "the whole box"
    lines.append(
        f"I_DINO / I_CLIP (region): each subject's region cropped to its bounding box ({crop}, "
        "padded to a square), mean cosine against every photo of that subject's own folder; per "
        "prompt over the regions found, then over prompts, subjects and pairs."
    )
    lines.append(
        "Collapse rate: share of the measured regions whose DINO similarity to the other "
        "subject's photos is higher than to their own (pooled). Missing rate: share of the "
        "regions where the subject was not found (under "
        f"{regions_mod.MIN_REGION_AREA:.1%} of the image)."
    )
    lines.append(
        "T_CLIP: the whole image against "
        + (
            "the prompt with the class phrases"
            if o.tclip_mode == "class"
            else "the template verbatim"
        )
        + f" (--tclip-mode {o.tclip_mode}); results_subjects.csv holds both."
    )
    lines.append(f"Regions: --regions {o.regions}.")
    lines.extend(report.notes)
    return lines


def write_subject_reports(report: SubjectsReport, out_dir: str, scorers: Scorers) -> dict:
    files = {
        "csv": os.path.join(out_dir, "results_subjects.csv"),
        "per_pair": os.path.join(out_dir, "results_subjects_per_pair.csv"),
        "per_subject": os.path.join(out_dir, "results_subjects_per_subject.csv"),
        "per_region": os.path.join(out_dir, "results_subjects_per_region.csv"),
        "md": os.path.join(out_dir, "results_subjects.md"),
        "json": os.path.join(out_dir, "results_subjects.json"),
    }
    _write_csv(files["csv"], report.rows, SUBJECT_RESULT_COLUMNS)
    _write_csv(files["per_pair"], report.per_group, PER_PAIR_COLUMNS)
    _write_csv(files["per_subject"], report.per_subject, PER_SUBJECT_COLUMNS)
    _write_csv(files["per_region"], report.per_region, PER_REGION_COLUMNS)
    md = [
        "# Layout-and-Retouch evaluation: several subjects",
        "",
        subjects_markdown_table(report.rows),
        "",
    ]
    md += [f"- {line}" for line in describe_subjects(report, scorers)]
    with open(files["md"] + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    os.replace(files["md"] + ".tmp", files["md"])
    _write_json(files["json"], report, scorers)
    report.files = files
    return files


def _plain(value):
    """A value as JSON has it: NaN → null, tuples → lists, floats as they are."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return float(value) if hasattr(value, "__float__") else str(value)


def _write_json(path: str, report: SubjectsReport, scorers: Scorers) -> None:
    """results_subjects.json: the summary per method, per pair, per subject and every region (each
    image × subject: where its region came from, its area, its identity against its own and the
    other subject's photos, collapsed or not), the notes and the options (NaN: null)."""
    o = report.options
    data = {
        "protocol": SUBJECTS_PROTOCOL,
        "options": {
            "tclip_mode": o.tclip_mode,
            "regions": o.regions,
            "crop": o.crop,
            "paired": o.paired,
        },  # fmt: skip
        "random_weights": bool(scorers.random_weights),
        "summary": report.rows,
        "per_pair": report.per_group,
        "per_subject": report.per_subject,
        "per_region": [
            {c: r.get(c) for c in PER_REGION_COLUMNS} | {"folders": r.get("folders")}
            for r in report.per_region
        ],
        "notes": report.notes,
    }
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(_plain(data), f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
