"""Session fixture for the host tier: a live AUTOMATIC1111 WebUI with this repo as an extension.

How the WebUI is found (first that applies):
  LR_WEBUI_URL   attach to a running WebUI (started with --api). Optional beside it: LR_WEBUI_PID (for
                 the memory test), LR_WEBUI_LOG (its stdout, for the log-line tests). It must have the
                 tiny checkpoints loaded (see tiny_checkpoints.py); tests that need what it lacks skip.
  LR_WEBUI_DIR   start one from this WebUI folder with LR_WEBUI_PYTHON (default /work/host/venv/bin/python),
                 default /work/host/webui when it exists (tests/host/setup_webui.sh builds both);
                 LR_WEBUI_DIR=none turns the default off.
Otherwise every host test is skipped: "no WebUI: set LR_WEBUI_DIR or LR_WEBUI_URL; see tests/host/README.md".

A started WebUI gets a temporary --data-dir whose extensions/sd-webui-layout-retouch is a symlink to
this repository, the tiny checkpoints as --ckpt-dir, the TI embedding as --embeddings-dir, the LoRA as
--lora-dir, a models/sam folder with a corrupt and a to-be-deleted SAM file, and its stdout+stderr in
<data-dir>/webui.log. It is stopped (by its PID) at the end of the session.
Extra env: LR_WEBUI_ARGS (more command-line args), LR_HOST_MODELS (cache folder of the tiny models),
LR_WEBUI_KEEP=1 (keep the temp folder for inspection).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import host_helpers as H  # noqa: E402
import host_server as S  # noqa: E402
import tiny_checkpoints as TC  # noqa: E402

NO_WEBUI = "no WebUI: set LR_WEBUI_DIR or LR_WEBUI_URL; see tests/host/README.md"
DEFAULT_DIR = "/work/host/webui"
DEFAULT_PYTHON = "/work/host/venv/bin/python"
EXTENSION_NAME = "sd-webui-layout-retouch"
PROBE_DIR = os.path.join(HERE, "probe")  # a test-only extension: see probe/scripts/lr_unet_probe.py
SAM_CORRUPT = H.SAM_CORRUPT
SAM_MISSING = H.SAM_MISSING
START_TIMEOUT = float(os.environ.get("LR_WEBUI_START_TIMEOUT", "300"))


def _webui_source():
    """('url', url) | ('dir', webui_dir, python) | (None, reason)."""
    return S.find_source("LR_WEBUI", DEFAULT_DIR, DEFAULT_PYTHON, NO_WEBUI)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long host test (50 generations); deselect with -m 'not slow'"
    )


def pytest_report_header(config):
    src = _webui_source()
    if src[0] == "url":
        return f"host WebUI: attach to {src[1]}"
    if src[0] == "dir":
        return f"host WebUI: start {src[1]} with {src[2]}"
    return f"host WebUI: {src[1]} -> every host test is skipped"


def _models_cache_dir() -> str:
    env = os.environ.get("LR_HOST_MODELS")
    if env:
        return env
    h = hashlib.sha1()
    for p in TC.SOURCES:
        with open(os.path.join(REPO_ROOT, p), "rb") as f:
            h.update(f.read())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sd-webui-layout-retouch", "host-models-" + h.hexdigest()[:12])


def _build_models(webui_dir: str, python: str) -> dict:
    """Build (or reuse) the tiny models with the WebUI's own Python and ldm, so the keys match."""
    cache = _models_cache_dir()
    if not os.path.exists(os.path.join(cache, TC.MARKER)):
        repos = os.path.join(webui_dir, "repositories")
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONPATH=os.pathsep.join(
                [
                    os.path.join(repos, "stable-diffusion-stability-ai"),
                    os.path.join(repos, "generative-models"),
                ]
            ),
        )
        tmp = cache + ".tmp-%d" % os.getpid()
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(
            [python, os.path.join(HERE, "tiny_checkpoints.py"), tmp],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"building the tiny models failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        # The yamls name the CLIP folder by absolute path: rewrite tmp -> cache before moving.
        for fn in os.listdir(os.path.join(tmp, "Stable-diffusion")):
            if fn.endswith(".yaml"):
                p = os.path.join(tmp, "Stable-diffusion", fn)
                with open(p, encoding="utf-8") as f:
                    text = f.read()
                with open(p, "w", encoding="utf-8") as f:
                    f.write(text.replace(tmp, cache))
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        os.rename(tmp, cache)
    return _paths(cache)


def _paths(root: str) -> dict:
    return {
        "root": root,
        "clip": os.path.join(root, "clip"),
        "ckpt_dir": os.path.join(root, "Stable-diffusion"),
        "embeddings_dir": os.path.join(root, "embeddings"),
        "lora_dir": os.path.join(root, "Lora"),
    }


def _start(webui_dir: str, python: str, tmp: str, ui: bool = False) -> S.Server:
    built = _build_models(webui_dir, python)
    data_dir = os.path.join(tmp, "data")
    os.makedirs(os.path.join(data_dir, "extensions"))
    os.symlink(REPO_ROOT, os.path.join(data_dir, "extensions", EXTENSION_NAME))
    # test-only: counts UNet calls by weights (GET /lr-probe/unet-calls)
    os.symlink(PROBE_DIR, os.path.join(data_dir, "extensions", "lr-unet-probe"))
    # Checkpoints are copied per session (a test moves one away and overwrites its name, then puts it
    # back: a hard link is enough, the cached file is never written); CLIP folders stay cached.
    ckpt_dir = os.path.join(tmp, "Stable-diffusion")
    shutil.copytree(built["ckpt_dir"], ckpt_dir, copy_function=S.link_or_copy)
    sam_dir = os.path.join(data_dir, "models", "sam")
    os.makedirs(sam_dir)
    with open(os.path.join(sam_dir, SAM_CORRUPT), "wb") as f:
        f.write(b"this is not a SAM checkpoint" * 100)
    with open(os.path.join(sam_dir, SAM_MISSING), "wb") as f:
        f.write(b"deleted by the test before it is used")
    # No cond cache across requests: a bit-identity test must see a text encoder left patched.
    # Live previews stay on (a test checks the retouch's preview) but with "Approx cheap": with an
    # SDXL model the default "Approx NN" downloads vaeapprox-sdxl.pt (fails offline); cheap needs no file.
    with open(os.path.join(data_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write('{"persistent_cond_cache": false, "show_progress_type": "Approx cheap"}')
    port = S.free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(data_dir, "webui.log")
    args = (
        [python, "-u", "launch.py", "--skip-prepare-environment", "--api"]
        + ([] if ui else ["--nowebui"])
        + [
            "--use-cpu",
            "all",
            "--no-half",
            "--skip-torch-cuda-test",
            "--skip-version-check",
            "--no-download-sd-model",
            "--do-not-download-clip",
            "--disable-console-progressbars",
            "--server-name",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            data_dir,
            "--ckpt-dir",
            ckpt_dir,
            "--ckpt",
            os.path.join(ckpt_dir, TC.PERSONAL + ".safetensors"),
            "--embeddings-dir",
            built["embeddings_dir"],
            "--lora-dir",
            built["lora_dir"],
        ]
    )
    args += os.environ.get("LR_WEBUI_ARGS", "").split()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return S.start(
        args,
        webui_dir,
        env,
        url,
        log_path,
        START_TIMEOUT,
        "WebUI",
        data_dir=data_dir,
        models=dict(built, ckpt_dir=ckpt_dir, sam_dir=sam_dir),
    )


def _warm_up(w: S.Server) -> None:
    """Read the checkpoint titles; load the personalized model (it loads on the first generation)."""
    w.read_titles()
    H.txt2img(
        w.url,
        H.plain_body(
            "warm up", steps=2, override_settings={"sd_model_checkpoint": w.title(TC.PERSONAL)}
        ),
    )


@contextlib.contextmanager
def _started(src, prefix: str, ui: bool = False):
    """A WebUI started from `src` ('dir', webui_dir, python) in a new temporary folder, warmed up;
    stopped at the end and its folder removed (kept, and said, with LR_WEBUI_KEEP=1)."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        w = _start(src[1], src[2], tmp, ui=ui)
        try:
            _warm_up(w)
            yield w
        finally:
            S.stop(w)
    finally:
        if not os.environ.get("LR_WEBUI_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"\nhost WebUI folder kept: {tmp}")


@pytest.fixture(scope="session")
def webui():
    src = _webui_source()
    if src[0] is None:
        pytest.skip(src[1])
    if src[0] == "dir":
        with _started(src, "lr-host-") as w:
            yield w
        return
    w = S.Server(
        src[1],
        pid=int(os.environ["LR_WEBUI_PID"]) if os.environ.get("LR_WEBUI_PID") else None,
        log_path=os.environ.get("LR_WEBUI_LOG") or None,
    )
    if not w.alive():
        raise RuntimeError(f"LR_WEBUI_URL={src[1]} does not answer /sdapi/v1/sd-models")
    try:
        _warm_up(w)
        yield w
    finally:
        S.stop(w)


@pytest.fixture(scope="session")
def webui_ui():
    """A second WebUI WITH its browser UI (no --nowebui), for the browser tier: started only when a
    browser test runs. LR_WEBUI_UI_URL attaches to a running one instead."""
    why = S.browser_missing()
    if why:
        pytest.skip(why)
    url = os.environ.get("LR_WEBUI_UI_URL")
    if url:
        w = S.Server(
            url.rstrip("/"),
            log_path=os.environ.get("LR_WEBUI_UI_LOG") or None,
            env_prefix="LR_WEBUI_UI",
        )
        w.read_titles()
        yield w
        return
    src = _webui_source()
    if src[0] != "dir":
        pytest.skip(
            src[1]
            if src[0] is None
            else "the browser tier starts its own WebUI: set LR_WEBUI_DIR "
            "(or LR_WEBUI_UI_URL for one started without --nowebui)"
        )
    with _started(src, "lr-host-ui-", ui=True) as w:
        yield w


@pytest.fixture(scope="session")
def url(webui) -> str:
    return webui.url


@pytest.fixture(scope="session")
def reference_b64() -> str:
    return H.png_b64(H.reference_rgb())


@pytest.fixture(scope="session")
def plain_before(webui):
    """The plain (extension off) image and infotext made before any enabled run: the baseline every
    "bit-identical afterwards" test compares with. Session-scoped, so it is made at first use; the
    test modules use it in their first test."""
    r = H.txt2img(webui.url, H.plain_body())
    assert r.ok, r.describe()
    return r


@pytest.fixture(scope="session")
def lr_defaults(webui, reference_b64) -> dict:
    """A full named-args dict: DreamBooth mode, tiny-personal (loaded) vs tiny-vanilla, 8 steps,
    λ1=2, λ2=3, mask start 6 taken literally (scale_with_steps off), no SAM."""
    return H.default_lr(reference_b64, webui.title(TC.VANILLA))


@pytest.fixture
def lr(lr_defaults):
    """A fresh copy of the defaults: `lr(lambda1=3)` → the dict with that changed."""

    def make(**kw):
        d = dict(lr_defaults)
        d.update(kw)
        return d

    return make


@pytest.fixture(scope="module")
def sdxl_model(webui, plain_before):
    """The tiny SDXL model loaded for one test module, the SD1 tiny-personal again afterwards.

    Checks that the switch really happened: the options report the SDXL title, a plain generation
    says `Model: tiny-xl-personal`, and the SDXL embedding (`clip_l` 32 + `clip_g` 256 = 288 wide) is
    loaded while the SD1 one (32 wide) is skipped — only an SDXL conditioner expects 288. Afterwards:
    the SD1 model is back and a plain generation is bit-identical to the session's SD1 baseline."""
    title = H.set_checkpoint(webui.url, webui.title(TC.XL_PERSONAL))
    try:
        r = H.txt2img(webui.url, H.plain_body("sdxl switch check", steps=2))
        assert r.ok and H.parse_infotext(r.infotexts[0]).get("Model") == TC.XL_PERSONAL, (
            r.describe()
        )
        emb = H.get(webui.url, "/sdapi/v1/embeddings")
        assert emb["loaded"].get(TC.XL_EMBEDDING, {}).get("shape") == 32 + 256, (
            f"the SDXL embedding is not loaded at width 288: the model is not SDXL? {emb}"
        )
        assert TC.EMBEDDING in emb["skipped"], emb
        yield title
    finally:
        H.set_checkpoint(webui.url, webui.title(TC.PERSONAL))
        back = H.txt2img(webui.url, H.plain_body())
        assert H.parse_infotext(back.infotexts[0]).get("Model") == TC.PERSONAL, back.describe()
        assert np.array_equal(back.image, plain_before.image), (
            "after the SDXL module, the SD1 plain image differs from the session's baseline"
        )
        assert back.infotexts[0] == plain_before.infotexts[0]


def pytest_collection_modifyitems(config, items):
    # Run the plain-WebUI checks first (they take the baseline), the SDXL module after the SD1 ones
    # (one model switch there and back), the memory soak last.
    order = {
        "test_host_webui.py": 0,
        "test_host_sdxl.py": 7,
        "test_host_img2img_sdxl.py": 7,
        "test_host_memory.py": 9,
    }
    items.sort(key=lambda it: order.get(os.path.basename(str(it.fspath)), 5))


@pytest.fixture(scope="session")
def photo_path(tmp_path_factory):
    """The reference photo as a file, for the browser tiers' uploads (A1111 and Forge)."""
    p = tmp_path_factory.mktemp("photo") / "subject.png"
    H.reference_rgb().save(p)
    return str(p)
