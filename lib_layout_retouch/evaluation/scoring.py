"""Score a run folder: every metric per (method, concept, prompt), then the tables and heat maps.

Reads `<out>/images/<method>/<concept>/*.png` with their `.json` sidecars (written by the runner;
any folder laid out the same way works: a sidecar needs at least "template" and "class", and
"folder" or a run.json/--vico that locates the concept's reference photos). Writes

    results.csv              one row per method (the table)
    results.md               the same as a markdown table, with notes on how each number was made
    results_per_concept.csv  one row per (method, concept)
    results_per_prompt.csv   one row per (method, concept, prompt)
    heatmaps/<method>.png    Fig. 1-style centre-point heat map over all concepts (+ one per concept)

Averaging (DreamMatcher's evaluate.py): per prompt, then the mean over prompts per concept, then the
mean over concepts per method. IS and σ²_avg are computed per concept over all its images and
averaged over concepts.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import LayoutRetouchError
from . import diversity
from .metrics import (
    DEFAULT_IS_SPLITS,
    DEFAULT_TCLIP_MODE,
    TCLIP_MODES,
    effective_splits,
    fmt,
    inception_score,
    mean_cosine,
    nanmean,
    tclip_text,
)
from .regions import REGIONS_SUFFIX
from .runner import METHOD_LABELS, METHODS, SINGLE_PROTOCOL, read_run_file, run_protocol_of

TABLE_COLUMNS = ("I_DINO", "I_CLIP", "T_CLIP", "ImageReward", "IS", "sigma2_avg")
TABLE_HEADERS = {"sigma2_avg": "σ²_avg"}


@dataclass
class ImageRecord:
    path: str
    method: str
    concept: str
    prompt_index: int
    template: str
    class_phrase: str
    seed: int | None
    folder: str  # reference photos


@dataclass
class Scorers:
    """The networks; any may be None, and `reasons` says why (shown as n/a notes)."""

    clip: object | None = None
    dino: object | None = None
    inception: object | None = None
    image_reward: Callable | None = None
    sam: object | None = None
    reasons: dict = field(default_factory=dict)
    random_weights: bool = False


@dataclass
class ScoreOptions:
    tclip_mode: str = DEFAULT_TCLIP_MODE
    centre_mode: str = "bbox"
    is_splits: int = DEFAULT_IS_SPLITS
    heatmap_sigma: float = diversity.DEFAULT_HEATMAP_SIGMA
    paired: bool = True  # score only (concept, prompt, seed) present for every method


@dataclass
class ScoreReport:
    rows: list  # per method
    per_concept: list
    per_prompt: list
    notes: list
    heatmaps: dict  # method -> png path (pooled)
    options: ScoreOptions
    files: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- records
def collect_records(
    out_dir: str, vico_dir: str | None = None
) -> tuple[list[ImageRecord], list[str]]:
    """Every generated image with its sidecar. Returns (records, warnings)."""
    images_dir = os.path.join(out_dir, "images")
    if not os.path.isdir(images_dir):
        raise LayoutRetouchError(
            f"{images_dir} does not exist: --out must be a folder written by `run` "
            f"(images/<method>/<concept>/*.png).",
            parameter="out",
        )
    run = read_run_file(out_dir)
    if run_protocol_of(run) != SINGLE_PROTOCOL:
        raise LayoutRetouchError(
            f"{out_dir} holds a several-subjects run: score it with "
            "subjects_scoring.score_subjects_run (the command line's `score` does).",
            parameter="out",
        )
    run_concepts = run.get("concepts", {})
    vico = vico_dir or run.get("vico")
    records, warnings = [], []
    for method, concept, path in _generated_images(images_dir):
        spec = run_concepts.get(concept, {})
        record = _image_record(path, method, concept, spec, vico, vico_dir, warnings)
        if record is not None:
            records.append(record)
    if not records:
        raise LayoutRetouchError(f"No scorable images under {images_dir}.", parameter="out")
    return records, warnings


def _generated_images(images_dir: str):
    """(method, concept, path) of each generated image under images/<method>/<concept>/ (not the
    subject masks or the extra images)."""
    for method in sorted(os.listdir(images_dir)):
        mdir = os.path.join(images_dir, method)
        if not os.path.isdir(mdir):
            continue
        for concept in sorted(os.listdir(mdir)):
            cdir = os.path.join(mdir, concept)
            if not os.path.isdir(cdir):
                continue
            for name in sorted(os.listdir(cdir)):
                if name.endswith(".png") and not name.endswith(
                    (diversity.MASK_SUFFIX, REGIONS_SUFFIX)
                ):
                    if ".extra" not in name:
                        yield method, concept, os.path.join(cdir, name)


def _image_record(path, method, concept, spec, vico, vico_dir, warnings) -> ImageRecord | None:
    """The image's record from its JSON sidecar, or None with a warning when it cannot be scored."""
    side = os.path.splitext(path)[0] + ".json"
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        warnings.append(f"skipped {path}: no readable sidecar {os.path.basename(side)} ({e})")
        return None
    folder = reference_folder(spec.get("folder") or meta.get("folder"), concept, vico, vico_dir)
    if "template" not in meta or not (meta.get("class") or spec.get("class_phrase")):
        warnings.append(f"skipped {path}: its sidecar lacks 'template' or 'class'")
        return None
    return ImageRecord(
        path=path,
        method=method,
        concept=concept,
        prompt_index=int(meta.get("prompt_index", -1)),
        template=meta["template"],
        class_phrase=meta.get("class") or spec.get("class_phrase"),
        seed=meta.get("seed"),
        folder=folder,
    )


def reference_folder(folder: str | None, name: str, vico: str | None, vico_dir: str | None) -> str:
    """The recorded reference folder, re-rooted in `vico` by its folder name when --vico was given
    (moved data) or the recorded folder is gone."""
    if vico and (vico_dir or not folder or not os.path.isdir(folder)):
        folder = os.path.join(vico, os.path.basename(folder) if folder else name)
    return folder or ""


def pair_records(records: list[ImageRecord]) -> tuple[list[ImageRecord], int]:
    """Keep the (concept, prompt, seed) keys every method has, so on/off compare like with like."""
    methods = {r.method for r in records}
    keys = defaultdict(set)
    for r in records:
        keys[(r.concept, r.prompt_index, r.template, r.seed)].add(r.method)
    kept = [r for r in records if keys[(r.concept, r.prompt_index, r.template, r.seed)] == methods]
    return kept, len(records) - len(kept)


# ---------------------------------------------------------------------------------------- scoring
def _rank(method: str) -> tuple:
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def _method_order(methods) -> list[str]:
    known = [m for m in METHODS if m in methods]
    return known + sorted(m for m in methods if m not in METHODS)


def score_run(
    out_dir: str,
    scorers: Scorers,
    options: ScoreOptions | None = None,
    vico_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ScoreReport:
    """Score every image of a run folder: per prompt, per concept, per method, and the heat maps."""
    from tqdm import tqdm

    options = options or ScoreOptions()
    _check_options(options)
    say = log or (lambda m: tqdm.write(m))
    out_dir = os.path.abspath(out_dir)
    notes: list[str] = []
    records = _records_to_score(out_dir, vico_dir, options, say, notes)
    tally = _Tally(ref_emb=_reference_embeddings(records, scorers))
    groups: dict[tuple[str, str], list[ImageRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, r.concept)].append(r)
    bar = tqdm(total=len(records), desc="scoring", unit="img", disable=not progress)
    for (method, concept), recs in sorted(
        groups.items(), key=lambda kv: (_rank(kv[0][0]), kv[0][1])
    ):
        _score_concept(method, concept, recs, scorers, options, out_dir, tally, bar)
    bar.close()
    if tally.unreadable:
        notes.append(
            f"{len(tally.unreadable)} unreadable image(s) were skipped (delete them and rerun `run` to remake "
            f"them): " + "; ".join(tally.unreadable[:3])
        )
    heatmaps = {
        method: diversity.save_heatmap_png(
            pts,
            os.path.join(out_dir, "heatmaps", f"{method}.png"),
            title=f"{METHOD_LABELS.get(method, method)}, pooled",
            sigma=options.heatmap_sigma,
        )
        for method, pts in tally.centres_by_method.items()
    }
    notes.extend(_mask_notes(tally.mask_sources))
    notes.extend(f"{k} n/a: {v}" for k, v in scorers.reasons.items())
    return ScoreReport(
        rows=_method_rows(tally.per_concept, options),
        per_concept=tally.per_concept,
        per_prompt=tally.per_prompt,
        notes=notes,
        heatmaps=heatmaps,
        options=options,
    )


@dataclass
class _Tally:
    """What scoring gathers over the (method, concept) groups."""

    ref_emb: dict  # reference folder -> {"dino": embeddings or None, "clip": ...}
    text_cache: dict = field(default_factory=dict)  # T_CLIP text -> its CLIP embedding
    per_prompt: list = field(default_factory=list)
    per_concept: list = field(default_factory=list)
    centres_by_method: dict = field(default_factory=lambda: defaultdict(list))
    mask_sources: dict = field(default_factory=lambda: defaultdict(int))
    unreadable: list = field(default_factory=list)


def _check_options(options: ScoreOptions) -> None:
    if options.tclip_mode not in TCLIP_MODES:
        raise LayoutRetouchError(
            f"Unknown T_CLIP mode '{options.tclip_mode}'; use one of {TCLIP_MODES}.",
            parameter="tclip_mode",
        )
    if options.centre_mode not in diversity.CENTRE_MODES:
        raise LayoutRetouchError(
            f"Unknown centre mode '{options.centre_mode}'; use one of {diversity.CENTRE_MODES}.",
            parameter="centre",
        )


def _records_to_score(out_dir, vico_dir, options, say, notes) -> list[ImageRecord]:
    """The run's images (paired across methods unless --unpaired); warnings said, notes added."""
    records, warnings = collect_records(out_dir, vico_dir)
    if options.paired and len({r.method for r in records}) > 1:
        records, dropped = pair_records(records)
        if dropped:
            notes.append(
                f"{dropped} image(s) without a counterpart in every method were left out (paired scoring; "
                f"finish the run or pass --unpaired)."
            )
    for w in warnings:
        say(w)
    return records


def _reference_embeddings(records: list[ImageRecord], scorers: Scorers) -> dict:
    return embed_reference_folders({r.folder for r in records}, scorers)


def embed_reference_folders(folders, scorers: Scorers) -> dict:
    """All photos of each concept's folder ({I_r^m}, m = 1..M), embedded once:
    {folder: {"dino": embeddings or None, "clip": …}}."""
    from .models import list_images, load_image

    ref_emb: dict[str, dict[str, object]] = {}
    for folder in sorted(folders):
        if not os.path.isdir(folder):
            raise LayoutRetouchError(
                f"Reference folder '{folder}' does not exist: pass --vico with the ViCo folder.",
                parameter="vico",
            )
        photos = [load_image(p) for p in list_images(folder)]
        if not photos:
            raise LayoutRetouchError(f"No reference photos in '{folder}'.", parameter="vico")
        ref_emb[folder] = {
            "dino": scorers.dino.embed_images(photos) if scorers.dino else None,
            "clip": scorers.clip.embed_images(photos) if scorers.clip else None,
        }
    return ref_emb


def _score_concept(method, concept, recs, scorers, options, out_dir, tally, bar) -> None:
    """One (method, concept) group: its prompt rows, its concept row, its centres and heat map."""
    from .models import load_image

    recs = sorted(
        recs, key=lambda r: (r.prompt_index, r.seed if r.seed is not None else -1, r.path)
    )
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
    prompt_rows = _prompt_rows(method, concept, kept, images, scorers, options, tally)
    tally.per_prompt.extend(prompt_rows)
    crow = {"method": method, "concept": concept, "images": len(kept), "prompts": len(prompt_rows)}
    for col in ("I_DINO", "I_CLIP", "T_CLIP_class", "T_CLIP_keep", "ImageReward"):
        crow[col] = nanmean([p[col] for p in prompt_rows])
    if scorers.inception is not None:
        crow["IS"], crow["IS_std"] = inception_score(
            scorers.inception.probs(images), options.is_splits
        )
        crow["IS_splits"] = effective_splits(len(images), options.is_splits)
    else:
        crow["IS"], crow["IS_std"], crow["IS_splits"] = float("nan"), float("nan"), 0
    centres = _centres(kept, images, scorers, options, tally.mask_sources)
    crow["centres"] = len(centres)
    crow["sigma2_avg"] = diversity.sigma2_avg(centres) if len(centres) >= 2 else float("nan")
    if centres:
        tally.centres_by_method[method].extend(centres)
        diversity.save_heatmap_png(
            centres,
            os.path.join(out_dir, "heatmaps", f"{method}__{concept}.png"),
            title=f"{METHOD_LABELS.get(method, method)} / {concept}",
            sigma=options.heatmap_sigma,
        )
    tally.per_concept.append(crow)


def _prompt_rows(method, concept, kept, images, scorers, options, tally) -> list[dict]:
    """I_DINO, I_CLIP, T_CLIP (both modes) and ImageReward of each prompt's images."""
    dino = scorers.dino.embed_images(images) if scorers.dino else None
    clip = scorers.clip.embed_images(images) if scorers.clip else None
    refs = tally.ref_emb[kept[0].folder]
    by_prompt: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, r in enumerate(kept):
        by_prompt[(r.prompt_index, r.template)].append(i)
    rows = []
    for (pi, template), idx in sorted(by_prompt.items()):
        row = {
            "method": method,
            "concept": concept,
            "prompt_index": pi,
            "template": template,
            "images": len(idx),
            "I_DINO": mean_cosine(refs["dino"], dino[idx]) if dino is not None else float("nan"),
            "I_CLIP": mean_cosine(refs["clip"], clip[idx]) if clip is not None else float("nan"),
        }
        class_phrase = kept[idx[0]].class_phrase
        for mode in TCLIP_MODES:
            text = tclip_text(template, class_phrase, mode)
            if clip is not None and text not in tally.text_cache:
                tally.text_cache[text] = scorers.clip.embed_texts([text])
            row[f"T_CLIP_{mode}"] = (
                mean_cosine(tally.text_cache[text], clip[idx]) if clip is not None else float("nan")
            )
        if scorers.image_reward is not None:
            text = tclip_text(template, class_phrase, options.tclip_mode)
            row["ImageReward"] = nanmean(scorers.image_reward(text, [images[i] for i in idx]))
        else:
            row["ImageReward"] = float("nan")
        rows.append(row)
    return rows


def _centres(kept, images, scorers, options, mask_sources) -> list:
    """The subject centre of each image that has a subject mask (its source counted)."""
    centres = []
    for r, img in zip(kept, images):
        mask, source = diversity.subject_mask(r.path, img, r.class_phrase, scorers.sam)
        mask_sources[source] += 1
        c = diversity.mask_centre(mask, options.centre_mode) if mask is not None else None
        if c is not None:
            centres.append(c)
    return centres


def _method_rows(per_concept: list[dict], options: ScoreOptions) -> list[dict]:
    """One row per method: the means over its concepts (the paper's table)."""
    rows = []
    for method in _method_order({c["method"] for c in per_concept}):
        cs = [c for c in per_concept if c["method"] == method]
        row = {
            "method": method,
            "label": METHOD_LABELS.get(method, method),
            "images": sum(c["images"] for c in cs),
            "concepts": len(cs),
        }
        for col in (
            "I_DINO",
            "I_CLIP",
            "T_CLIP_class",
            "T_CLIP_keep",
            "ImageReward",
            "IS",
            "IS_std",
            "sigma2_avg",
        ):
            row[col] = nanmean([c[col] for c in cs])
        row["T_CLIP"] = row[f"T_CLIP_{options.tclip_mode}"]
        row["IS_splits"] = min((c["IS_splits"] for c in cs), default=0)
        row["centres"] = sum(c["centres"] for c in cs)
        rows.append(row)
    return rows


def _mask_notes(mask_sources: dict) -> list[str]:
    if mask_sources.get("none") and not (mask_sources.get("png") or mask_sources.get("sam")):
        return [
            "σ²_avg n/a: no subject masks. Pass --sam <SAM checkpoint>, or save <image>.mask.png beside "
            "each image."
        ]
    if mask_sources.get("none"):
        return [f"σ²_avg: {mask_sources['none']} image(s) had no mask and were left out."]
    return []


# ---------------------------------------------------------------------------------------- writing
def _csv_value(v):
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6f}"
    return v


def _write_csv(path: str, rows: list[dict], columns: Sequence[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in columns})
    os.replace(tmp, path)


def markdown_table(rows: list[dict]) -> str:
    head = "| method | " + " | ".join(TABLE_HEADERS.get(c, c) for c in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(TABLE_COLUMNS)
    lines = [head, sep]
    for r in rows:
        cells = [fmt(r[c], 4 if c == "sigma2_avg" else 3) for c in TABLE_COLUMNS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(report: ScoreReport, scorers: Scorers) -> list[str]:
    """The notes under the table: how every number was made."""
    o = report.options
    rows = report.rows
    lines = []
    if scorers.random_weights:
        lines.append(
            "**RANDOM WEIGHTS** (--random-models): these numbers only show that the plumbing works."
        )
    if rows:
        lines.append(
            "Images per method: "
            + ", ".join(f"{r['label']} {r['images']} over {r['concepts']} concept(s)" for r in rows)
            + "."
        )
    other = "keep" if o.tclip_mode == "class" else "class"
    lines.append(
        "T_CLIP text: "
        + (
            'placeholder replaced by the class phrase ("a {} in the jungle" -> "a dog in the jungle")'
            if o.tclip_mode == "class"
            else 'prompt-list line verbatim, placeholder kept ("a {} in the jungle"), as DreamMatcher\'s code'
        )
        + f". With the other mode ({other}): "
        + ", ".join(f"{r['label']} {fmt(r['T_CLIP_' + other])}" for r in rows)
        + "."
    )
    lines.append(
        "I_DINO / I_CLIP: mean cosine over all (reference photo, generated image) pairs per prompt, averaged "
        "over prompts, then concepts (DreamMatcher's evaluate.py); images squashed to 256x256 first"
        + (f"; DINO input: {scorers.dino.preprocess_mode}" if scorers.dino is not None else "")
        + "."
    )
    if scorers.clip is not None:
        from .models import CLIP_RESIZE_DESCRIPTIONS

        resize = getattr(scorers.clip, "resize", None)
        lines.append(
            f"CLIP input resize ({resize}): {CLIP_RESIZE_DESCRIPTIONS.get(resize, 'custom embedder')}"
            f" (--clip-resize)."
        )
    if scorers.image_reward is not None:
        lines.append("ImageReward: mean score per prompt (text as T_CLIP), same averaging.")
    if scorers.inception is not None:
        fewest = min((r["IS_splits"] for r in rows), default=0)
        lines.append(
            f"IS: torchvision Inception-v3 softmax, per concept over all its images, mean over "
            f"min({o.is_splits}, n/2) consecutive splits, split k = images [k·n/K, (k+1)·n/K) as "
            f"OpenAI's inception_score.py (fewest used: {fewest}), averaged over concepts."
        )
    centre = "bounding-box centre" if o.centre_mode == "bbox" else "mask centroid"
    lines.append(
        f"σ²_avg: (Var x + Var y)/2 of subject centre points ({centre}, "
        f"normalised to [0,1]²) per concept, averaged over concepts; heat maps in heatmaps/ "
        f"(Gaussians of fixed σ = {o.heatmap_sigma} at each centre, max-normalised)."
    )
    lines.extend(report.notes)
    return lines


# The columns of results.csv, results_per_concept.csv and results_per_prompt.csv.
RESULT_COLUMNS = ("method", "label", "images", "concepts", "I_DINO", "I_CLIP", "T_CLIP",
    "T_CLIP_class", "T_CLIP_keep", "ImageReward", "IS", "IS_std", "IS_splits", "sigma2_avg",
    "centres")  # fmt: skip
PER_CONCEPT_COLUMNS = ("method", "concept", "images", "prompts", "I_DINO", "I_CLIP",
    "T_CLIP_class", "T_CLIP_keep", "ImageReward", "IS", "IS_std", "IS_splits", "sigma2_avg",
    "centres")  # fmt: skip
PER_PROMPT_COLUMNS = ("method", "concept", "prompt_index", "template", "images", "I_DINO",
    "I_CLIP", "T_CLIP_class", "T_CLIP_keep", "ImageReward")  # fmt: skip


def write_reports(report: ScoreReport, out_dir: str, scorers: Scorers) -> dict:
    files = {
        "csv": os.path.join(out_dir, "results.csv"),
        "per_concept": os.path.join(out_dir, "results_per_concept.csv"),
        "per_prompt": os.path.join(out_dir, "results_per_prompt.csv"),
        "md": os.path.join(out_dir, "results.md"),
    }
    _write_csv(files["csv"], report.rows, RESULT_COLUMNS)
    _write_csv(files["per_concept"], report.per_concept, PER_CONCEPT_COLUMNS)
    _write_csv(files["per_prompt"], report.per_prompt, PER_PROMPT_COLUMNS)
    md = ["# Layout-and-Retouch evaluation", "", markdown_table(report.rows), ""]
    md += [f"- {line}" for line in describe(report, scorers)]
    with open(files["md"] + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    os.replace(files["md"] + ".tmp", files["md"])
    report.files = {**files, **{f"heatmap_{m}": p for m, p in report.heatmaps.items()}}
    return report.files


def build_scorers(
    dino: str = "default",
    clip: str = "default",
    inception: str = "default",
    imagereward: str = "auto",
    sam: str = "",
    sam_type: str | None = None,
    device: str | None = None,
    dino_preprocess: str = "dreammatcher",
    clip_resize: str = "dreammatcher",
    random_models: bool = False,
    scratch_dir: str | None = None,
) -> Scorers:
    """Load what the options name. "none" skips a metric (n/a); "default" uses the library cache;
    `random_models` builds tiny random networks instead (plumbing checks only)."""
    s = Scorers(random_weights=random_models)
    if random_models:
        _random_feature_models(
            s, clip, dino, inception, device, clip_resize, dino_preprocess, scratch_dir
        )
    else:
        _feature_models(s, clip, dino, inception, device, clip_resize, dino_preprocess)
    for name, _choice, attr in (
        ("I_CLIP/T_CLIP", clip, "clip"),
        ("I_DINO", dino, "dino"),
        ("IS", inception, "inception"),
    ):
        if getattr(s, attr) is None:
            s.reasons[name] = f"skipped (--{attr} none)"
    _image_reward(s, imagereward, device)
    if sam:
        s.sam = diversity.SamSubjectMasker.from_checkpoint(
            sam, sam_type, device=device, clip=s.clip
        )
    return s


def _random_feature_models(s, clip, dino, inception, device, clip_resize, dino_preprocess, scratch):
    """Tiny random CLIP/DINO/Inception (plumbing checks only, no download)."""
    import tempfile

    from . import models

    tok_dir = os.path.join(scratch or tempfile.mkdtemp(prefix="lr_eval_"), "tiny_clip_tokenizer")
    if clip != "none":
        s.clip = models.build_random_clip(tok_dir, device=device or "cpu", resize=clip_resize)
    if dino != "none":
        s.dino = models.build_random_dino(preprocess=dino_preprocess, device=device or "cpu")
    if inception != "none":
        s.inception = models.build_random_inception(device=device or "cpu")


def _feature_models(s, clip, dino, inception, device, clip_resize, dino_preprocess):
    """The real CLIP/DINO/Inception the options name ("default": the library cache's)."""
    from . import models

    if clip != "none":
        s.clip = models.load_clip(
            models.DEFAULT_CLIP if clip == "default" else clip, device=device, resize=clip_resize
        )
    if dino != "none":
        s.dino = models.load_dino(
            models.DEFAULT_DINO if dino == "default" else dino,
            device=device,
            preprocess=dino_preprocess,
        )
    if inception != "none":
        s.inception = models.load_inception(
            models.DEFAULT_INCEPTION if inception == "default" else inception, device=device
        )


def _image_reward(s, imagereward: str, device) -> None:
    """ImageReward unless "none"; "auto" leaves it out with the reason when it cannot load."""
    from . import models

    if imagereward == "none":
        s.reasons["ImageReward"] = "skipped (--imagereward none)"
        return
    explicit = imagereward != "auto"
    scorer, reason = models.load_image_reward(
        models.DEFAULT_IMAGE_REWARD if not explicit else imagereward,
        device=device,
        required=explicit,
    )
    s.image_reward = scorer
    if scorer is None:
        s.reasons["ImageReward"] = reason
