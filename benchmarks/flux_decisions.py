"""The measurements behind docs/ALGORITHM.md's "DiT (Flux)" decisions, on the tiny Flux (CPU, ~1 min).

    .venv/bin/python benchmarks/flux_decisions.py [--json out.json]

1. inversion: reconstruction error ‖sample(invert(z0)) − z0‖/‖z0‖ of Euler and of the second-order
   midpoint (RF-Solver-2) solver at several step counts, with the transformer calls each costs;
2. reference positions: with the reference = the layout (so a target query and the reference key at the
   same cell carry the same content, as in a positional head), the share of the target's reference
   attention that lands on the reference token at its OWN grid cell — shared vs shifted positions
   (uniform would be 1/n): how strongly RoPE alone ties the reference's layout onto the target;
3. own image tokens: the share of the target's image-query attention that goes to the reference when
   its own image tokens are also keys, and how far the result moves from the layout either way;
4. blocks: how much the reference K/V at one block alone changes the velocity (relative), per block.
The tiny model is random: (1) and (2) measure numerics and geometry, not taste; (3)–(4) check that
each choice acts, the blocks themselves come from the literature (Stable Flow's vital layers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import NamedTuple, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lib_layout_retouch import conditioning as C
from lib_layout_retouch import retouch as pl
from lib_layout_retouch.dit import flow
from lib_layout_retouch.dit.flux.blocks import DiTRetouchAttention, patched_blocks
from lib_layout_retouch.dit.flux.family import FluxFamily
from lib_layout_retouch.dit.flux.layers import layer_table_for_dit
from lib_layout_retouch.dit.joint import SHARED, SHIFTED, JointProcessor
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch.editor import COND, LAYOUT, REFERENCE, TARGET, RowPlan, StepState
from lib_layout_retouch.retouch.layers import LayerTable
from lib_layout_retouch.schedule import Schedule
from tests.fixtures.flux import build_tiny_flux_model, make_tiny_t5_folder
from tests.fixtures.sd1 import make_tiny_clip_folder
from tests.paths import photo_tensor


class Recording:
    """While in use, records per paint the target image queries' attention over their keys."""

    def __init__(self):
        self.probs = []

    def __enter__(self):
        real = self.real = JointProcessor.paint
        probs = self.probs

        def paint(proc, state, at, results, q, k, v, out, span, **kv_of):
            real(proc, state, at, results, q, k, v, out, span, **kv_of)
            n_txt = kv_of["n_txt"]  # a joint block: [text ; image] tokens
            for half, rows in at.target_rows:
                kr, _ = proc.reference_kv(state, half, q, k, v, **kv_of)
                keys = [k[rows, :, :n_txt], kr.expand(rows.stop - rows.start, -1, -1, -1)]
                if proc.options.with_target_tokens:
                    keys.append(k[rows, :, n_txt:])
                qi = q[rows, :, n_txt:].float()
                logits = qi @ torch.cat(keys, 2).float().transpose(-1, -2) * qi.shape[-1] ** -0.5
                probs.append((proc.name, n_txt, logits.softmax(-1)))

        JointProcessor.paint = paint
        return self

    def __exit__(self, *exc):
        JointProcessor.paint = self.real


def one_paint_call(model, editor, z_ref, z_t, conds, sigma=0.6):
    plan = RowPlan.build([(REFERENCE, 1), (LAYOUT, 1), (TARGET, 1)], halves=(COND,))
    cond = C.cat([conds.reference, conds.layout, conds.target])
    editor.begin_step(StepState(plan, paint_identity=True))
    with patched_blocks(model.transformer, editor), torch.no_grad():
        return model.velocity(torch.cat([z_ref, z_t, z_t]), sigma, cond)


def retouch(model, ref, layout, conds, subject, lambda2, with_target_tokens=False):
    model.family = FluxFamily(with_target_tokens=with_target_tokens)
    return pl.retouch(
        model,
        reference_latent=ref,
        layout_latents=layout,
        conds=conds,
        subject_tokens=subject,
        settings=pl.RetouchSettings(
            schedule=Schedule.for_steps(8, lambda1=1, lambda2=lambda2, mask_start=9, scale=False),
            guidance_scale=1.0,
        ),
    )


class FluxCase(NamedTuple):
    """The tiny Flux, its conditionings for "a sks dog on the beach", the subject's T5 rows, the
    dog photo's latent, one random layout latent, the latent size, the inferred block table."""

    model: object
    conds: object
    subject: list
    ref: torch.Tensor
    layout: torch.Tensor
    hw: tuple
    table: LayerTable

    @property
    def n_img(self) -> int:
        return (self.hw[0] // 2) * (self.hw[1] // 2)

    def editor(self, table: Optional[LayerTable] = None, **options) -> DiTRetouchAttention:
        """The retouch editor over `table` (default: the inferred one) with the model's RoPE."""
        return DiTRetouchAttention(
            self.table if table is None else table,
            self.subject,
            self.hw,
            rope_of=self.model.transformer.pe_embedder,
            **options,
        )


def flux_case() -> FluxCase:
    tmp = tempfile.mkdtemp()
    model = build_tiny_flux_model(
        make_tiny_t5_folder(os.path.join(tmp, "t5")),
        make_tiny_clip_folder(os.path.join(tmp, "clip")),
    )
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    ref = model.encode(photo_tensor())
    hw = tuple(ref.shape[-2:])
    return FluxCase(
        model=model,
        conds=pl.encode_prompts(model, prompts, ""),
        subject=model.subject_tokens(prompts.personalized, ["sks", "dog"]),
        ref=ref,
        layout=0.6 * torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(7)),
        hw=hw,
        table=layer_table_for_dit(model.transformer),
    )


def inversion_errors(case: FluxCase) -> list[dict]:
    """1. The relative reconstruction error of invert + sample with the same solver, per T."""
    empty = case.model.conditioning([""])

    def velocity(x, sigma):
        return case.model.velocity(x, sigma, C.expand(empty, x.shape[0]))

    rows = []
    for steps in (4, 8, 16, 28, 50):
        sched = case.model.schedule(steps, case.hw)
        for solver in flow.SOLVERS:
            for name, z0 in (("photo", case.ref), ("random", case.layout)):
                err = flow.reconstruction_error(velocity, z0, sched, solver)
                calls = 2 * steps * flow.EVALUATIONS[solver]
                rows.append(dict(steps=steps, solver=solver, latent=name, error=err, calls=calls))
    print("inversion: relative reconstruction error (invert + sample, same solver)")
    for r in rows:
        print(
            f"  T={r['steps']:>2} {r['solver']:<8} {r['latent']:<6} {r['error']:.2e}  ({r['calls']} calls)"
        )
    return rows


def reference_rope_share(case: FluxCase) -> dict:
    """2. Reference = layout: the share of the target's reference attention on the same cell."""
    rope = {}
    for mode in (SHARED, SHIFTED):
        with Recording() as rec:
            one_paint_call(
                case.model, case.editor(reference_rope=mode), case.layout, case.layout, case.conds
            )
        diag = []
        for _name, n_txt, p in rec.probs:
            pr = p[..., n_txt : n_txt + case.n_img]  # (1, H, n, n) over the reference tokens
            pr = pr / pr.sum(-1, keepdim=True)
            diag.append(pr.diagonal(dim1=-2, dim2=-1).mean().item())
        rope[mode] = sum(diag) / len(diag)
    print(
        f"reference = layout, share of reference attention on the same cell: shared {rope[SHARED]:.3f}, "
        f"shifted {rope[SHIFTED]:.3f} (uniform {1 / case.n_img:.3f})"
    )
    return dict(rope, uniform=1 / case.n_img)


def positional_head_geometry() -> dict:
    """2b. The same with a purely positional head at Flux.1's real geometry (head dim 128, axes
    16/56/56, 64×64 tokens = 1024²): every query and key is one RMS-normed vector u, so RoPE alone
    decides where the target's attention over the reference tokens goes."""
    from lib_layout_retouch.dit.flux.blocks import apply_rope
    from lib_layout_retouch.dit.tokens import image_ids
    from tests.fixtures.flux import EmbedND

    geometry = {}
    for grid, axes in (((4, 4), (8, 12, 12)), ((64, 64), (16, 56, 56))):
        d = sum(axes)
        embed = EmbedND(d, 10_000, axes)
        u = torch.randn(d, generator=torch.Generator().manual_seed(0))
        u = u / u.pow(2).mean().sqrt()  # RMS-normed, as Flux's QK-norm makes them
        n = grid[0] * grid[1]
        x = u.expand(1, 1, n, d)
        q = apply_rope(x, embed(image_ids(grid)))
        out = {}
        for mode, offset in ((SHARED, 0), (SHIFTED, grid[1])):
            k = apply_rope(x, embed(image_ids(grid, col_offset=offset)))
            p = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)[0, 0]  # (n, n)
            cols = p.view(n, grid[0], grid[1]).sum(1)  # mass per reference column
            out[mode] = dict(
                same_cell=p.diagonal().mean().item(),
                left_edge_column=cols[:, 0].mean().item(),
            )
        geometry[f"{grid[0]}x{grid[1]}"] = dict(out, uniform=1 / n)
        print(
            f"positional head {grid[0]}×{grid[1]}: same-cell share shared {out[SHARED]['same_cell']:.3f}, "
            f"shifted {out[SHIFTED]['same_cell']:.4f}; left reference column shared "
            f"{out[SHARED]['left_edge_column']:.3f}, shifted {out[SHIFTED]['left_edge_column']:.3f} "
            f"(uniform cell {1 / n:.4f}, column {1 / grid[1]:.3f})"
        )
    return geometry


def own_image_tokens(case: FluxCase) -> dict:
    """3. The target's own image tokens among the keys or not: the reference's share of the image
    queries' attention, and how far the retouch moves from the layout's regeneration."""
    own = {}
    for with_target in (False, True):
        with Recording() as rec:
            one_paint_call(
                case.model,
                case.editor(with_target_tokens=with_target),
                case.ref,
                case.layout,
                case.conds,
            )
        share = [
            p[..., n_txt : n_txt + case.n_img].sum(-1).mean().item() for _n, n_txt, p in rec.probs
        ]
        res = retouch(case.model, case.ref, case.layout, case.conds, case.subject, 2, with_target)
        ref_res = retouch(
            case.model, case.ref, case.layout, case.conds, case.subject, 8
        )  # λ2 = T: the layout
        moved = ((res.latents - ref_res.latents).norm() / ref_res.latents.norm()).item()
        own[str(with_target)] = dict(
            reference_attention_share=sum(share) / len(share), moved_from_layout=moved
        )
    for k, v in own.items():
        print(
            f"own image tokens among the keys={k}: reference share {v['reference_attention_share']:.3f}, "
            f"result moved from the layout's regeneration by {v['moved_from_layout']:.3f} (relative)"
        )
    return own


def block_influence(case: FluxCase) -> dict:
    """4. How much the reference K/V at one block alone change the velocity (relative), per block."""
    nothing = case.editor(LayerTable("none", (), (), ()))
    base = one_paint_call(case.model, nothing, case.ref, case.layout, case.conds)[2]
    transformer = case.model.transformer
    names = [f"double_blocks.{i}" for i in range(len(transformer.double_blocks))] + [
        f"single_blocks.{i}" for i in range(len(transformer.single_blocks))
    ]
    influence = {}
    for name in names:
        one = case.editor(LayerTable(name, (name,), (), (name,)))
        v = one_paint_call(case.model, one, case.ref, case.layout, case.conds)[2]
        influence[name] = ((v - base).norm() / base.norm()).item()
    print(
        "velocity change from the reference K/V at one block:",
        {k: round(v, 4) for k, v in influence.items()},
    )
    return influence


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    case = flux_case()
    results = dict(
        inversion=inversion_errors(case),
        rope_diagonal_share=reference_rope_share(case),
        rope_positional_head=positional_head_geometry(),
        with_target_tokens=own_image_tokens(case),
        block_influence=block_influence(case),
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
