"""Command line: `python -m lib_layout_retouch.evaluation run|score ...` (see --help of each)."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from ..errors import LayoutRetouchError
from ..masks import DEFAULT_CA_THRESHOLD
from ..schedule import (
    PAPER_LAMBDA1,
    PAPER_LAMBDA1_CHALLENGING,
    PAPER_LAMBDA2,
    PAPER_MASK_START,
    PAPER_STEPS,
)
from ..segmentation import SAM_KINDS
from .regions import CROP_MODES, DEFAULT_CROP_MODE, DEFAULT_REGION_SOURCE, REGION_SOURCES


def _add_region_args(g) -> None:
    """Scoring options of the several-subjects protocol: where each region comes from, its crop."""
    g.add_argument(
        "--regions",
        default=DEFAULT_REGION_SOURCE,
        choices=list(REGION_SOURCES),
        help="several subjects: where each subject's region comes from. 'auto' (default): the "
        "extension's regions picture kept beside the image (<image>.regions.png), else SAM (--sam) "
        "prompted with the subject's class phrase; 'picture': the picture only; 'sam': SAM for "
        "every image (the same measurement for both methods)",
    )
    g.add_argument(
        "--region-crop",
        default=DEFAULT_CROP_MODE,
        choices=list(CROP_MODES),
        help="several subjects: the crop identity is measured on, the region's bounding box with "
        "the pixels outside the region grey ('masked', default) or kept ('bbox')",
    )


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "scoring (models load from a local path or the library caches; nothing is downloaded)"
    )
    g.add_argument(
        "--dino",
        default="default",
        help="DINO ViT-S/16 folder (a saved facebook/dino-vits16), 'default' (HF cache) or 'none'",
    )
    g.add_argument(
        "--clip",
        default="default",
        help="CLIP ViT-B/32 folder (a saved openai/clip-vit-base-patch32), 'default' (HF cache) or 'none'",
    )
    g.add_argument(
        "--inception",
        default="default",
        help="torchvision inception_v3 state dict (.pth), 'default' (torch hub cache) or 'none'",
    )
    g.add_argument(
        "--imagereward",
        default="auto",
        help="'auto' (use it if the optional image-reward package and its model are there), 'none', "
        "or a model name / ImageReward.pt path. Install: pip install image-reward",
    )
    g.add_argument(
        "--sam",
        default="",
        help="SAM checkpoint for subject masks (σ²_avg, heat maps); without it "
        "only <image>.mask.png files beside the images are used",
    )
    g.add_argument(
        "--sam-type",
        default=None,
        choices=list(SAM_KINDS),
        help="SAM model type (guessed from the checkpoint name)",
    )
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    g.add_argument(
        "--tclip-mode",
        default="class",
        choices=["class", "keep"],
        help="T_CLIP text: 'class' replaces the prompt's {} with the class phrase (default); 'keep' uses "
        "the prompt-list line verbatim as DreamMatcher's code does. Both are in results.csv",
    )
    g.add_argument(
        "--dino-preprocess",
        default="dreammatcher",
        choices=["dreammatcher", "imagenet"],
        help="DINO input: DreamMatcher's [-1,1] 256x256 (default) or the ImageNet-normalised 224 crop",
    )
    g.add_argument(
        "--clip-resize",
        default="dreammatcher",
        choices=["dreammatcher", "antialias"],
        help="CLIP input resize: DreamMatcher's (bicubic, no antialiasing: the published numbers' "
        "arithmetic; default) or antialiased bicubic. results.md says which was used",
    )
    g.add_argument(
        "--centre",
        default="bbox",
        choices=["bbox", "centroid"],
        help="subject centre: mask bounding-box centre (paper, default) or mask centroid",
    )
    _add_region_args(g)
    g.add_argument(
        "--is-splits",
        type=int,
        default=10,
        help="Inception Score splits (clamped to n/2 per concept)",
    )
    g.add_argument(
        "--heatmap-sigma", type=float, default=0.05, help="heat-map Gaussian σ, in image widths"
    )
    g.add_argument(
        "--unpaired",
        action="store_true",
        help="score every image, even where the other method lacks the same (concept, prompt, seed)",
    )
    g.add_argument(
        "--random-models",
        action="store_true",
        help="tiny random-weight CLIP/DINO/Inception: checks the plumbing, numbers are meaningless",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_subjects_run_args(p: argparse.ArgumentParser) -> None:
    """`run`'s options of the several-subjects protocol."""
    p.add_argument(
        "--subjects",
        action="store_true",
        help="the several-subjects protocol: each image holds a pair of concepts (the concept "
        'file\'s "pairs", else every pair one image can hold), identity measured in each '
        "subject's region; use its own --out",
    )
    p.add_argument(
        "--pairs", type=int, default=None, help="with --subjects: only the first N pairs"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m lib_layout_retouch.evaluation",
        description="Layout-and-Retouch evaluation: the paper's metrics over a ViCo sweep.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="generate the sweep through the WebUI API (resumable), then score it"
    )
    run.add_argument(
        "--vico", required=True, help="ViCo folder: concept folders, imgs_source.txt, prompt lists"
    )
    run.add_argument(
        "--concepts", required=True, help="concept file (JSON): concept -> token, class, ..."
    )
    run.add_argument(
        "--url",
        action="append",
        default=None,
        help="WebUI started with --api (default http://127.0.0.1:7860); repeat it to spread the sweep "
        "over several WebUIs (each concept's checkpoint stays where it is loaded; a WebUI that "
        "stops answering hands its requests to the others)",
    )
    run.add_argument(
        "--per-server",
        type=int,
        default=1,
        help="requests in flight on each WebUI at once (default 1)",
    )
    run.add_argument(
        "--out", required=True, help="output folder (rerun the same command to resume)"
    )
    run.add_argument(
        "--n", type=int, default=8, help="images per (concept, prompt) and method (paper: 8)"
    )
    run.add_argument(
        "--prompts", type=int, default=None, help="use only the first K prompts of each list"
    )
    run.add_argument("--prompt-set", default="normal", choices=["normal", "challenging"])
    run.add_argument(
        "--seed", type=int, default=0, help="seeds are SEED..SEED+n-1, the same for on and off"
    )
    run.add_argument("--steps", type=int, default=PAPER_STEPS)
    run.add_argument("--cfg", type=float, default=7.5)
    run.add_argument("--width", type=int, default=512)
    run.add_argument("--height", type=int, default=512)
    run.add_argument("--sampler", default="DDIM")
    run.add_argument("--negative", default="", help="negative prompt")
    run.add_argument("--methods", default="off,on", help="which of off,on to generate")
    run.add_argument(
        "--lambda1",
        type=int,
        default=None,
        help=f"default: {PAPER_LAMBDA1} (normal prompts), {PAPER_LAMBDA1_CHALLENGING} (challenging)",
    )
    run.add_argument("--lambda2", type=int, default=PAPER_LAMBDA2)
    run.add_argument("--mask-start", type=int, default=PAPER_MASK_START)
    run.add_argument("--ca-threshold", type=float, default=DEFAULT_CA_THRESHOLD)
    run.add_argument(
        "--sam-model", default="", help="the script's SAM model argument (not the scoring --sam)"
    )
    run.add_argument(
        "--vanilla-checkpoint",
        default="",
        help="the script's vanilla checkpoint (concepts may override)",
    )
    run.add_argument(
        "--retries", type=int, default=3, help="retries per request (connection errors, 5xx)"
    )
    run.add_argument(
        "--backoff", type=float, default=2.0, help="first retry wait in seconds; doubles each time"
    )
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    run.add_argument(
        "--api-auth", default=None, help="user:password when the WebUI runs with --api-auth"
    )
    run.add_argument(
        "--no-masks",
        action="store_true",
        help="do not ask the extension for its subject masks (by default each ON image's mask is "
        "saved as <image>.mask.png and used for σ²_avg and the heat maps)",
    )
    run.add_argument(
        "--on-marker",
        default="LR lambda1",
        help="text every 'on' infotext must contain (proof the script ran); '' turns the check off",
    )
    _add_subjects_run_args(run)
    run.add_argument("--no-score", action="store_true", help="only generate")
    _add_scoring_args(run)

    score = sub.add_parser(
        "score", help="score a run folder and write results.csv / results.md / heatmaps"
    )
    score.add_argument("--out", required=True, help="folder written by `run`")
    score.add_argument("--vico", default=None, help="ViCo folder, if it moved since the run")
    _add_scoring_args(score)
    return ap


def _score(args, out_dir: str) -> int:
    from .subjects_scoring import is_subjects_run

    if is_subjects_run(out_dir):
        return _score_subjects(args, out_dir)
    from .scoring import (
        ScoreOptions,
        build_scorers,
        collect_records,
        markdown_table,
        score_run,
        write_reports,
    )

    collect_records(
        out_dir, getattr(args, "vico_override", None)
    )  # a wrong --out fails before models load
    scorers = build_scorers(
        dino=args.dino,
        clip=args.clip,
        inception=args.inception,
        imagereward=args.imagereward,
        sam=args.sam,
        sam_type=args.sam_type,
        device=args.device,
        dino_preprocess=args.dino_preprocess,
        clip_resize=args.clip_resize,
        random_models=args.random_models,
    )
    options = ScoreOptions(
        tclip_mode=args.tclip_mode,
        centre_mode=args.centre,
        is_splits=args.is_splits,
        heatmap_sigma=args.heatmap_sigma,
        paired=not args.unpaired,
    )
    report = score_run(
        out_dir,
        scorers,
        options,
        vico_dir=getattr(args, "vico_override", None),
        progress=not args.no_progress,
    )
    files = write_reports(report, out_dir, scorers)
    print(markdown_table(report.rows))
    for note in report.notes:
        print(f"note: {note}")
    print(
        "wrote "
        + ", ".join(files[k] for k in ("csv", "per_concept", "per_prompt", "md"))
        + (f" and heat maps in {os.path.join(out_dir, 'heatmaps')}" if report.heatmaps else "")
    )
    return 0


def _score_subjects(args, out_dir: str) -> int:
    """`score` of a several-subjects run folder: identity in each subject's region, collapse,
    T_CLIP (IS, ImageReward and σ²_avg belong to the one-subject protocol)."""
    from .scoring import build_scorers
    from .subjects_scoring import (
        SubjectScoreOptions,
        collect_group_records,
        score_subjects_run,
        subjects_markdown_table,
        write_subject_reports,
    )

    vico = getattr(args, "vico_override", None)
    collect_group_records(out_dir, vico)  # a wrong --out fails before models load
    scorers = build_scorers(
        dino=args.dino,
        clip=args.clip,
        inception="none",
        imagereward="none",
        sam=args.sam if args.regions != "picture" else "",
        sam_type=args.sam_type,
        device=args.device,
        dino_preprocess=args.dino_preprocess,
        clip_resize=args.clip_resize,
        random_models=args.random_models,
    )
    scorers.reasons = {k: v for k, v in scorers.reasons.items() if k not in ("IS", "ImageReward")}
    options = SubjectScoreOptions(
        tclip_mode=args.tclip_mode,
        regions=args.regions,
        crop=args.region_crop,
        paired=not args.unpaired,
    )
    report = score_subjects_run(
        out_dir, scorers, options, vico_dir=vico, progress=not args.no_progress
    )
    files = write_subject_reports(report, out_dir, scorers)
    print(subjects_markdown_table(report.rows))
    for note in report.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(files.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        args.vico_override = args.vico
        return _score(args, os.path.abspath(args.out))
    except LayoutRetouchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: every image written so far is kept; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


def _run(args) -> int:
    """`run`: generate the protocol's images over the WebUI(s), then score them (unless --no-score)."""
    from .runner import WebUIClient, run_protocol
    from .subjects_runner import run_subjects_protocol

    urls = args.url or ["http://127.0.0.1:7860"]
    clients = [
        WebUIClient(
            u, timeout=args.timeout, retries=args.retries, backoff=args.backoff, auth=args.api_auth
        )
        for u in urls
    ]
    if args.pairs is not None and not args.subjects:
        raise LayoutRetouchError("--pairs goes with --subjects.", parameter="pairs")
    run = partial(run_subjects_protocol, max_groups=args.pairs) if args.subjects else run_protocol
    summary = run(
        args.vico,
        args.concepts,
        urls,
        args.out,
        _run_settings(args),
        client=clients,
        progress=not args.no_progress,
        per_server=args.per_server,
    )
    print(
        f"{summary.generated} image(s) generated, {summary.skipped} already there, "
        f"{summary.total} in all ({summary.out_dir})."
    )
    if args.no_score:
        return 0
    args.vico_override = None
    return _score(args, summary.out_dir)


def _run_settings(args):
    from .runner import RunSettings

    return RunSettings(
        n=args.n,
        n_prompts=args.prompts,
        prompt_set=args.prompt_set,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg,
        width=args.width,
        height=args.height,
        sampler=args.sampler,
        negative_prompt=args.negative,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        mask_start=args.mask_start,
        ca_threshold=args.ca_threshold,
        sam_model=args.sam_model,
        vanilla_checkpoint=args.vanilla_checkpoint,
        on_marker=args.on_marker,
        keep_masks=not args.no_masks,
    )


if __name__ == "__main__":
    sys.exit(main())
