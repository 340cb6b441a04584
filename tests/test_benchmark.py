"""The benchmark (benchmarks/bench_retouch.py) runs on the CPU with the tiny config: it prints the
table and writes JSON with every figure it promises (speed, memory, hook overhead, UNet calls and
rows, for batch 1 and 4). Numbers are only checked for being
sensible (positive, null where the CPU has no such figure), never for their size."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_retouch.py")
STEPS = 6

FIGURES = (
    "plain_s",
    "lr_paper_s",
    "lr_fast_s",
    "ratio_paper",
    "ratio_fast",
    "plain_peak_gib",
    "lr_peak_gib",
    "hook_overhead",
    "unet_calls",
)


def run_script(*argv: str, timeout: int) -> str:
    """A benchmark script on the CPU (`argv`: the script and its arguments); its stdout. One thread:
    on a busy 2-core CI machine two OpenMP threads spin-wait on each other (seen: 8 s → 300 s)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_bench(out, *args: str, timeout: int) -> tuple[str, dict]:
    """benchmarks/bench_retouch.py on the CPU with `args`, writing `out`: (stdout, the JSON)."""
    stdout = run_script(SCRIPT, "--device", "cpu", *args, "--out", str(out), timeout=timeout)
    return stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    stdout, res = run_bench(
        out,
        *("--config", "tiny", "--dtype", "fp32", "--steps", str(STEPS), "--threads", "1"),
        *("--warmup", "1", "--repeats", "1", "--hook-repeats", "2"),
        timeout=240,
    )
    return stdout, res, out


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_prints_the_table(bench):
    stdout, res, out = bench
    assert "Layout-and-Retouch benchmark" in stdout
    for label in (
        "plain (s)",
        "L&R paper (s)",
        "L&R fast (s)",
        "ratio paper",
        "ratio fast",
        "hooked/plain UNet fwd",
        "unet calls plain/paper/fast",
        "where the time goes",
    ):
        assert label in stdout, label
    header = next(line for line in stdout.splitlines() if line.startswith("figure"))
    assert "batch 1" in header and "batch 4" in header
    assert str(out) in stdout


def test_json_has_every_figure_for_batch_1_and_4(bench):
    _, res, _ = bench
    for key in ("card", "config", "dtype", "steps", "torch", "date", "batch4"):
        assert key in res, key
    assert (res["config"], res["dtype"], res["steps"], res["device"]) == (
        "tiny",
        "fp32",
        STEPS,
        "cpu",
    )
    assert res["card"].startswith("CPU")
    for d, batch in ((res, 1), (res["batch4"], 4)):
        assert d["batch"] == batch
        for key in FIGURES:
            assert key in d, (batch, key)
        for key in (
            "plain_s",
            "lr_paper_s",
            "lr_fast_s",
            "ratio_paper",
            "ratio_fast",
            "hook_overhead",
            "hook_overhead_blend",
        ):
            assert _positive(d[key]), (batch, key, d[key])
        assert math.isclose(d["ratio_paper"], d["lr_paper_s"] / d["plain_s"])
        assert math.isclose(d["ratio_fast"], d["lr_fast_s"] / d["plain_s"])
        # no CUDA memory on the CPU: null, not 0
        for key in ("plain_peak_gib", "lr_peak_gib", "lr_fast_peak_gib", "lr_extra_peak_gib"):
            assert d[key] is None, key
        assert d["reference_cached"] is True  # timed runs hit the warm reference cache
        assert set(d["goals"]) == {
            "ratio_fast",
            "ratio_paper",
            "lr_extra_peak_gib",
            "hook_overhead",
        }
        assert d["hook"]["identity"]["rows"] == 2 * (1 + 2 * batch)


def test_unet_calls_and_rows_follow_the_schedule(bench):
    """Counted by hooks on the UNets: plain T calls; paper = stage 1 + layout inversion + retouch
    (reference inversion cached); fast drops the layout inversion."""
    _, res, _ = bench
    T = STEPS
    lam2 = res["schedule"]["lambda2"]
    for d, n in ((res, 1), (res["batch4"], 4)):
        assert d["unet_calls"] == {"plain": T, "lr_paper": 3 * T, "lr_fast": 2 * T}
        retouch_rows = lam2 * 2 * n + (T - lam2) * 2 * (1 + 2 * n)
        assert d["retouch_unet_calls"] == {"lr_paper": 2 * T, "lr_fast": T}
        assert d["retouch_unet_rows"] == {"lr_paper": T * n + retouch_rows, "lr_fast": retouch_rows}
        assert d["unet_rows"] == {
            "plain": T * 2 * n,
            "lr_paper": T * 2 * n + T * n + retouch_rows,
            "lr_fast": T * 2 * n + retouch_rows,
        }


def test_phases_account_for_the_run(bench):
    _, res, _ = bench
    ph = res["phases_s"]
    assert set(ph["plain"]) >= {"stage1", "vae"} and "retouch" not in ph["plain"]
    assert ph["lr_paper"]["layout_inversion"] > 0 and "layout_inversion" not in ph["lr_fast"]
    assert "reference_inversion" not in ph["lr_paper"]  # cached
    for k in ("plain", "lr_paper", "lr_fast"):
        assert sum(ph[k].values()) == pytest.approx(res["runs_s"][k][0], rel=1e-6)


def test_cpu_results_never_land_as_committed_gpu_results():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_retouch
    finally:
        sys.path.pop(0)
    import torch

    cpu_default = bench_retouch.default_out("CPU x", "tiny", torch.device("cpu"))
    assert cpu_default.endswith("cpu-tiny.tmp.json")  # git-ignored
    gpu_default = bench_retouch.default_out("NVIDIA H100 80GB HBM3", "sd15", torch.device("cuda"))
    assert gpu_default.endswith(os.path.join("results", "nvidia-h100-80gb-hbm3-sd15.json"))


def test_what_the_hooks_add_is_one_gather_per_reference_layer_and_one_blend_per_blend_layer(bench):
    """Counted aten kernels of one UNet forward at the retouch batch, hooked vs plain: the identity
    phase adds one `index_select` per reference layer (the target rows' K/V source), the mask blend
    one in-place `lerp_` per blend layer for both CFG halves — nothing else, at any batch size."""
    _, res, _ = bench
    for d in (res, res["batch4"]):
        ident, blend = d["hook"]["identity"], d["hook"]["identity_blend"]
        n_ref, n_blend = ident["reference_layers"], ident["blend_layers"]
        assert n_ref >= 2 and n_blend >= 2
        assert ident["extra_kernels"] == {"index_select": n_ref}
        assert blend["extra_kernels"] == {"index_select": n_ref, "lerp_": n_blend}
        assert ident["hooked_kernels"] - ident["plain_kernels"] == n_ref
        assert ident["plain_kernels"] > 100


def test_tiny_sdxl_config_runs_with_dict_conditioning(tmp_path):
    """--config tiny-sdxl: the SDXL path (dict conditioning, the SDXL layer rule) end to end; the
    kernels the hooks add are one index_select per reference layer (10 in the tiny SDXL table)."""
    _, res = run_bench(
        tmp_path / "tiny-sdxl.json",
        *("--config", "tiny-sdxl", "--dtype", "fp32", "--steps", "4", "--threads", "1"),
        *("--warmup", "0", "--repeats", "1", "--hook-repeats", "1", "--batches", "1"),
        *("--kv-cache-gib", "0"),
        timeout=400,
    )
    assert res["config"] == "tiny-sdxl" and res["images_finite"]
    hook = res["hook"]["identity_blend"]
    assert hook["layer_table"] == "inferred-sdxl" and hook["reference_layers"] == 10
    assert hook["extra_kernels"] == {"index_select": 10, "lerp_": 10}
    assert set(res["goals"]) == {"ratio_fast", "lr_extra_peak_gib", "hook_overhead"}
    # no warm-up run, yet the reference inversion is cached (inverted once before the timed runs):
    # paper = stage 1 + layout inversion + retouch
    assert res["reference_cached"] is True
    assert res["unet_calls"] == {"plain": 4, "lr_paper": 12, "lr_fast": 8}


def test_two_subject_config_reports_its_rows_against_one_subject(tmp_path):
    """`--subjects 1 2`: L&R paper and fast with two subjects (one reference photo each), in the same
    run as one subject. The second subject adds exactly its reference row per CFG half in every
    identity step (T − λ2 steps) and nothing else: stage 1 and the layout inversion are the same.
    Without a warm-up run every timed run still finds its reference inversions cached (the
    benchmark inverts each photo once beforehand)."""
    T = STEPS
    stdout, res = run_bench(
        tmp_path / "tiny-subjects.json",
        *("--config", "tiny", "--dtype", "fp32", "--steps", str(T), "--threads", "1"),
        *("--warmup", "0", "--repeats", "1", "--hook-repeats", "1", "--batches", "1"),
        *("--kv-cache-gib", "0", "--subjects", "1", "2"),
        timeout=300,
    )
    lam2 = res["schedule"]["lambda2"]
    two = res["subjects"]["2"]
    one_retouch = lam2 * 2 + (T - lam2) * 2 * (1 + 2)
    two_retouch = lam2 * 2 + (T - lam2) * 2 * (2 + 2)
    assert res["retouch_unet_rows"]["lr_fast"] == one_retouch
    assert two["retouch_unet_rows_fast"] == two_retouch
    assert two["retouch_unet_rows_paper"] == T + two_retouch  # + the layout inversion
    assert two["unet_calls_paper"] == 3 * T and two["unet_calls_fast"] == 2 * T
    assert two["unet_rows_fast"] == 2 * T + two_retouch
    rows, calls = res["phase_rows"], res["phase_calls"]
    assert rows["lr_paper_2subj"] == {
        "stage1": 2 * T,
        "layout_inversion": T,
        "retouch": two_retouch,
    }
    assert calls["lr_fast_2subj"] == {"stage1": T, "retouch": T}
    assert rows["lr_fast"]["retouch"] == one_retouch  # the one-subject run beside it
    for name in ("paper", "fast"):
        assert math.isclose(two[f"ratio_{name}"], two[f"lr_{name}_s"] / res[f"lr_{name}_s"])
        assert _positive(two[f"retouch_ratio_{name}"]) and two[f"images_finite_{name}"]
        assert two[f"reference_cached_{name}"] and res["reference_cached"]
        assert _positive(two[f"cpu_ratio_{name}"]) and _positive(two[f"retouch_cpu_ratio_{name}"])
        assert two["goals"][f"ratio_{name}"]["goal"] == 1.3
    assert two["rows_ratio_fast"] == (2 * T + two_retouch) / (2 * T + one_retouch)
    assert set(res["phases_cpu_s"]["lr_fast_2subj"]) >= {"stage1", "retouch"}
    for label in ("L&R paper, 2 subjects (s)", "ratio fast 2/1 subject", "lr_fast_2subj"):
        assert label in stdout, label


def test_tiny_flux_benchmark_runs_plain_and_both_retouch_modes(tmp_path):
    """`--config tiny-flux` (benchmarks/bench_flux.py): the Flux retouch against a plain Flux run, with
    the transformer calls each costs (those are exact; the times only positive)."""
    stdout, res = run_bench(
        tmp_path / "tiny-flux.json",
        *("--config", "tiny-flux", "--steps", "4", "--warmup", "1", "--repeats", "1"),
        timeout=600,
    )
    T = 4
    assert res["plain_calls"] == T
    # stage 1 + two midpoint inversions + the midpoint retouch (2 calls per step)
    assert res["lr_paper_calls"] == T + 2 * 2 * T + 2 * T
    # stage 1 + the Euler retouch (reference inversion cached, layout on stage 1's trajectory)
    assert res["lr_fast_calls"] == 2 * T
    assert all(res[k] > 0 for k in ("plain_s", "lr_paper_s", "lr_fast_s"))
    assert "LR/plain" in stdout


def test_flux_decisions_measures_every_decision(tmp_path):
    """benchmarks/flux_decisions.py (docs/ALGORITHM.md's "DiT (Flux)" figures) runs on the tiny Flux
    and reports each measurement whole: the inversion error of both solvers at every T with the
    calls it costs, the same-cell shares against uniform, both own-token settings, every block."""
    from lib_layout_retouch.dit import flow

    out = tmp_path / "flux_decisions.json"
    run_script(
        os.path.join(ROOT, "benchmarks", "flux_decisions.py"), "--json", str(out), timeout=300
    )
    res = json.loads(out.read_text())
    rows = res["inversion"]
    assert {(r["steps"], r["solver"], r["latent"]) for r in rows} == {
        (t, s, z) for t in (4, 8, 16, 28, 50) for s in flow.SOLVERS for z in ("photo", "random")
    }
    assert all(r["calls"] == 2 * r["steps"] * flow.EVALUATIONS[r["solver"]] for r in rows)
    assert all(math.isfinite(r["error"]) and r["error"] >= 0 for r in rows)
    share = res["rope_diagonal_share"]
    assert share["uniform"] == 1 / 16  # 8×8 latents: 4×4 image tokens
    assert all(0 < share[k] <= 1 for k in ("shared", "shifted"))
    assert set(res["rope_positional_head"]) == {"4x4", "64x64"}
    assert set(res["with_target_tokens"]) == {"False", "True"}
    assert all(0 < v["reference_attention_share"] <= 1 for v in res["with_target_tokens"].values())
    blocks = res["block_influence"]
    assert {n.split(".")[0] for n in blocks} == {"double_blocks", "single_blocks"}
    assert all(v > 0 for v in blocks.values())
