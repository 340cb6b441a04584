"""Session fixture for the ComfyUI host tier: a live ComfyUI (v0.3.64) with this repo as a custom node.

Run it as its own tier, under the shared lock (full-size SD1.5 in fp32 on the CPU: ≈ 7 GiB):
    flock /tmp/lr-host.lock <comfy-venv>/bin/python -m pytest tests/host/comfy
`pytest tests/host` collects these tests but skips them ("ComfyUI tier not asked for") unless
LR_COMFY_DIR or LR_COMFY_URL is set.

How ComfyUI is found (first that applies):
  LR_COMFY_URL     attach to a running ComfyUI (started with --cache-none, this repo in its
                   custom_nodes/, the comfy-* models of comfy_checkpoints.py in its model folders).
  LR_COMFY_DIR     start one from this folder with LR_COMFY_PYTHON (default
                   /work/host/comfy-venv/bin/python); default /work/host/comfy when it has a main.py
                   (tests/host/setup_comfy.sh builds both); LR_COMFY_DIR=none turns the default off.
Otherwise every ComfyUI test is skipped: "no ComfyUI: set LR_COMFY_DIR or LR_COMFY_URL; …".

A started ComfyUI gets `--cpu --force-fp32 --cache-none` (so before/after runs recompute), a temporary
--base-directory (input/output/user files, and custom_nodes/ with a link to this checkout), an
extra_model_paths.yaml naming the comfy-* models (cached, built once with ComfyUI's Python).
Its stdout+stderr go to <tmp>/comfy.log. LR_COMFY_KEEP=1 keeps <tmp>. The test-only custom node
tiny_sam_node/ is linked beside this checkout and <tmp>/models/sams/sam_tiny.pth is the tiny random
SAM it lets our SAM loader read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(os.path.dirname(HOST))
if HOST not in sys.path:
    sys.path.insert(0, HOST)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import comfy_checkpoints as CC  # noqa: E402
import comfy_http as A  # noqa: E402
import host_server as S  # noqa: E402

NO_COMFY = "no ComfyUI: set LR_COMFY_DIR or LR_COMFY_URL; see tests/host/README.md (ComfyUI tier)"
DEFAULT_DIR = "/work/host/comfy"
DEFAULT_PYTHON = "/work/host/comfy-venv/bin/python"
NODE_FOLDER = "sd-webui-layout-retouch"
TINY_SAM = "sam_tiny.pth"
START_TIMEOUT = float(os.environ.get("LR_COMFY_START_TIMEOUT", "300"))


def comfy_source():
    """('url', url) | ('dir', comfy_dir, python) | (None, reason)."""
    return S.find_source("LR_COMFY", DEFAULT_DIR, DEFAULT_PYTHON, NO_COMFY, launcher="main.py")


def pytest_report_header(config):
    src = comfy_source()
    if src[0] == "url":
        return f"host ComfyUI: attach to {src[1]}"
    if src[0] == "dir":
        return f"host ComfyUI: start {src[1]} with {src[2]}"
    return f"host ComfyUI: {src[1]} -> every ComfyUI test is skipped"


def pytest_collection_modifyitems(config, items):
    S.skip_unless_asked(
        config,
        items,
        HERE,
        "LR_COMFY",
        "ComfyUI tier not asked for: run `pytest tests/host/comfy` (or set LR_COMFY_DIR / "
        "LR_COMFY_URL); see tests/host/README.md",
    )


def models_cache_dir() -> str:
    env = os.environ.get("LR_COMFY_MODELS")
    if env:
        return env
    h = hashlib.sha1()
    for name in ("comfy_checkpoints.py", "forge_checkpoints.py"):
        with open(os.path.join(HOST, name), "rb") as f:
            h.update(f.read())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sd-webui-layout-retouch", "comfy-models-" + h.hexdigest()[:12])


def build_models(comfy_dir: str, python: str) -> dict:
    """Build (or reuse) the comfy-* models with ComfyUI's Python and modules (≈ 4.2 GB)."""
    cache = models_cache_dir()
    if not os.path.exists(os.path.join(cache, CC.MARKER)):
        tmp = cache + ".tmp-%d" % os.getpid()
        shutil.rmtree(tmp, ignore_errors=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        r = subprocess.run(
            [python, os.path.join(HOST, "comfy_checkpoints.py"), tmp, "--comfy-dir", comfy_dir],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(
                f"building the models failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        os.rename(tmp, cache)
    return CC.paths(cache)


def write_tiny_sam(path: str) -> None:
    """The tiny random SAM (tests/fixtures/sam.py, seed 0) as a state-dict file, as SAM ships."""
    import importlib.util

    import torch

    # by its path: which `tests` package is importable depends on how pytest was started
    spec = importlib.util.spec_from_file_location(
        "layout_retouch_tiny_sam", os.path.join(REPO_ROOT, "tests", "fixtures", "sam.py")
    )
    sam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sam)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sam.build_tiny_sam(seed=0).state_dict(), path)


def start_comfy(comfy_dir: str, python: str, tmp: str) -> S.Server:
    built = build_models(comfy_dir, python)
    yaml = [
        "layout_retouch_tests:",
        f"  checkpoints: {built['checkpoints']}",
        f"  loras: {built['loras']}",
        f"  embeddings: {built['embeddings']}",
    ]
    # --base-directory makes <tmp>/custom_nodes ComfyUI's custom-node folder: it links this checkout
    # and the test-only tiny_sam_node; <tmp>/models/sams (ComfyUI's models folder) gets the tiny SAM
    nodes = os.path.join(tmp, "custom_nodes")
    os.makedirs(nodes)
    os.symlink(REPO_ROOT, os.path.join(nodes, NODE_FOLDER))
    os.symlink(os.path.join(HERE, "tiny_sam_node"), os.path.join(nodes, "lr_tiny_sam_node"))
    write_tiny_sam(os.path.join(tmp, "models", "sams", TINY_SAM))
    config = os.path.join(tmp, "extra_model_paths.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write("\n".join(yaml) + "\n")
    port = S.free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tmp, "comfy.log")
    args = [
        python,
        "-u",
        "main.py",
        "--cpu",
        "--force-fp32",
        "--cache-none",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        tmp,
        "--extra-model-paths-config",
        config,
        "--preview-method",
        "latent2rgb",
    ] + os.environ.get("LR_COMFY_ARGS", "").split()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    s = A.start(args, comfy_dir, env, url, log_path, START_TIMEOUT)
    s.models = built
    return s


@pytest.fixture(scope="session")
def comfy():
    """The live ComfyUI (a host_server.Server with `url`, `log_path`)."""
    src = comfy_source()
    if src[0] is None:
        pytest.skip(src[1])
    tmp = None
    if src[0] == "url":
        s = S.Server(src[1], what="ComfyUI", env_prefix="LR_COMFY")
    else:
        tmp = tempfile.mkdtemp(prefix="lr-comfy-")
        try:
            s = start_comfy(src[1], src[2], tmp)
        except BaseException:
            if not os.environ.get("LR_COMFY_KEEP"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        info = A.get(s.url, "/object_info/LayoutRetouchSampler")
        if "LayoutRetouchSampler" not in info:
            raise RuntimeError(f"the nodes did not load:\n{S.tail(s.log_path or '')}")
        yield s
    finally:
        S.stop(s)
        if tmp and not os.environ.get("LR_COMFY_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
