"""Session fixture for the Forge host tier: a live stable-diffusion-webui-forge with this repo as an extension.

Run it as its own tier:  pytest tests/host/forge
`pytest tests/host` (the A1111 tier) collects these tests but skips them ("Forge tier not asked for")
unless LR_FORGE_DIR or LR_FORGE_URL is set; the fixtures here shadow the A1111 ones, so a Forge test
never starts an A1111 WebUI, and an A1111 test never starts Forge.

How Forge is found (first that applies):
  LR_FORGE_URL     attach to a running Forge (started with --api, this repo in its extensions/, the
                   forge-* models of forge_checkpoints.py listed). Optional: LR_FORGE_PID (memory),
                   LR_FORGE_LOG (its stdout, for log-line checks). Tests needing what is missing skip.
  LR_FORGE_DIR     start one from this Forge folder with LR_FORGE_PYTHON (default
                   /work/host/forge-venv/bin/python); default /work/host/forge when it exists
                   (tests/host/setup_forge.sh builds both); LR_FORGE_DIR=none turns the default off.
Otherwise every Forge test is skipped: "no Forge: set LR_FORGE_DIR or LR_FORGE_URL; see tests/host/README.md".

A started Forge gets a temporary --data-dir whose extensions/sd-webui-layout-retouch is a symlink to this
repository, the forge-* checkpoints (hard links of the cached files) as --ckpt-dir, the TI embedding as
--embeddings-dir, the LoRA as --lora-dir, live previews and the cond cache off in config.json, and its
stdout+stderr in <data-dir>/forge.log. Flags: --always-cpu (Forge's own CPU switch; A1111's --use-cpu /
--no-half are not used) --skip-prepare-environment (nothing is cloned or installed) --nowebui --api.
Extra env: LR_FORGE_ARGS (more command-line args), LR_FORGE_MODELS (cache folder of the models),
LR_FORGE_KEEP=1 (keep the temp folder), LR_FORGE_START_TIMEOUT (seconds, default 600).

Fixture names are the A1111 tier's (`webui`, `url`, `plain_before`, `lr_defaults`, `lr`) so a check can
be written once for both tiers; here they are Forge's and shadow tests/host/conftest.py's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(os.path.dirname(HOST))
if HOST not in sys.path:
    sys.path.insert(0, HOST)

import forge_checkpoints as FC  # noqa: E402
import forge_tiny_checkpoints as FFC  # noqa: E402
import host_helpers as H  # noqa: E402
import host_server as S  # noqa: E402

NO_FORGE = "no Forge: set LR_FORGE_DIR or LR_FORGE_URL; see tests/host/README.md"
DEFAULT_DIR = "/work/host/forge"
DEFAULT_PYTHON = "/work/host/forge-venv/bin/python"
EXTENSION_NAME = "sd-webui-layout-retouch"
START_TIMEOUT = float(os.environ.get("LR_FORGE_START_TIMEOUT", "600"))
TINY_EXTENSION = "tiny_models_extension"  # test-only: registers the tiny Flux models' sizes/configs
TINY_ENV = "LR_FORGE_TINY_HF"  # where their tiny config folders are (read by that extension)


def _not_forge(d: str) -> str | None:
    return None if os.path.isdir(os.path.join(d, "backend")) else "is no Forge (no backend/)"


def forge_source():
    """('url', url) | ('dir', forge_dir, python) | (None, reason)."""
    return S.find_source("LR_FORGE", DEFAULT_DIR, DEFAULT_PYTHON, NO_FORGE, check=_not_forge)


def pytest_report_header(config):
    src = forge_source()
    if src[0] == "url":
        return f"host Forge: attach to {src[1]}"
    if src[0] == "dir":
        return f"host Forge: start {src[1]} with {src[2]}"
    return f"host Forge: {src[1]} -> every Forge test is skipped"


def pytest_collection_modifyitems(config, items):
    S.skip_unless_asked(
        config,
        items,
        HERE,
        "LR_FORGE",
        "Forge tier not asked for: run `pytest tests/host/forge` "
        "(or set LR_FORGE_DIR / LR_FORGE_URL); see tests/host/README.md",
    )


def models_cache_dir() -> str:
    env = os.environ.get("LR_FORGE_MODELS")
    if env:
        return env
    with open(os.path.join(HOST, "forge_checkpoints.py"), "rb") as f:
        h = hashlib.sha1(f.read()).hexdigest()[:12]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sd-webui-layout-retouch", "forge-models-" + h)


def flux_models_cache_dir() -> str:
    """The tiny Flux/SDXL models' own cache (a change of their builder does not rebuild the 4 GB SD1.5 set)."""
    env = os.environ.get("LR_FORGE_TINY_MODELS")
    if env:
        return env
    h = hashlib.sha1()
    for f in (
        os.path.join(HOST, "forge_tiny_checkpoints.py"),
        os.path.join(HERE, TINY_EXTENSION, "tiny_registration.py"),
    ):
        with open(f, "rb") as fh:
            h.update(fh.read())
    return os.path.join(
        os.path.dirname(models_cache_dir()), "forge-tiny-models-" + h.hexdigest()[:12]
    )


def _build(script: str, cache: str, marker: str, forge_dir: str, python: str) -> None:
    if os.path.exists(os.path.join(cache, marker)):
        return
    tmp = cache + ".tmp-%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [python, os.path.join(HOST, script), tmp, "--forge-dir", forge_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"building the Forge models ({script}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    os.rename(tmp, cache)


def build_flux_models(forge_dir: str, python: str) -> dict:
    """Build (or reuse) the tiny Flux and SDXL models and their tiny config folders (≈ 1 min, ≈ 150 MB)."""
    cache = flux_models_cache_dir()
    _build("forge_tiny_checkpoints.py", cache, FFC.MARKER, forge_dir, python)
    return FFC.paths(cache)


def build_models(forge_dir: str, python: str) -> dict:
    """Build (or reuse) the forge-* models with Forge's own Python and modules (≈ 1 min, ≈ 4.2 GB)."""
    cache = models_cache_dir()
    _build("forge_checkpoints.py", cache, FC.MARKER, forge_dir, python)
    return FC.paths(cache)


def start_forge(forge_dir: str, python: str, tmp: str, ui: bool = False) -> S.Server:
    built = build_models(forge_dir, python)
    flux = build_flux_models(forge_dir, python)
    data_dir = os.path.join(tmp, "data")
    os.makedirs(os.path.join(data_dir, "extensions"))
    os.symlink(REPO_ROOT, os.path.join(data_dir, "extensions", EXTENSION_NAME))
    # a test-only extension that replaces one attention layer when the prompt says `attnreplace`
    os.symlink(
        os.path.join(HERE, "attn_replace_extension"),
        os.path.join(data_dir, "extensions", "lr-test-attn-replace"),
    )
    # the tiny Flux models' registration (sizes from shapes, tiny text-encoder/VAE configs): test-only
    os.symlink(
        os.path.join(HERE, TINY_EXTENSION),
        os.path.join(data_dir, "extensions", "lr-test-tiny-models"),
    )
    ckpt_dir = os.path.join(tmp, "Stable-diffusion")
    shutil.copytree(built["ckpt_dir"], ckpt_dir, copy_function=S.link_or_copy)
    shutil.copytree(flux["ckpt_dir"], ckpt_dir, copy_function=S.link_or_copy, dirs_exist_ok=True)
    lora_dir = os.path.join(tmp, "Lora")
    shutil.copytree(built["lora_dir"], lora_dir, copy_function=S.link_or_copy)
    shutil.copytree(flux["lora_dir"], lora_dir, copy_function=S.link_or_copy, dirs_exist_ok=True)
    # Live previews off ("Approx NN" would download preview weights); no cond cache across requests
    # (a bit-identity check must see a text encoder left patched).
    with open(os.path.join(data_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write('{"live_previews_enable": false, "persistent_cond_cache": false}')
    port = S.free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(data_dir, "forge.log")
    args = (
        [python, "-u", "launch.py", "--skip-prepare-environment", "--api"]
        + ([] if ui else ["--nowebui"])
        + [
            "--always-cpu",
            "--skip-torch-cuda-test",
            "--skip-version-check",
            "--skip-python-version-check",
            "--no-download-sd-model",
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
            os.path.join(ckpt_dir, FC.PERSONAL + ".safetensors"),
            "--embeddings-dir",
            built["embeddings_dir"],
            "--lora-dir",
            lora_dir,
        ]
    )
    if ui:
        # gradio 4 serves /file= only from its allowed paths, which are the --data-dir by default: with a
        # data dir outside the Forge folder, Forge's own javascript/ (script.js, inputAccordion.js,
        # hints.js, ...) would be answered 403 and the page would run without it.
        args += ["--gradio-allowed-path", forge_dir]
    args += os.environ.get("LR_FORGE_ARGS", "").split()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env[TINY_ENV] = flux["hf_root"]
    env.pop("PYTHONPATH", None)
    w = S.start(
        args,
        forge_dir,
        env,
        url,
        log_path,
        START_TIMEOUT,
        "Forge",
        data_dir=data_dir,
        models=dict(built, ckpt_dir=ckpt_dir, lora_dir=lora_dir, flux=flux),
        env_prefix="LR_FORGE",
    )
    w.ui = ui
    return w


BROWSER_MODULE = "test_forge_browser.py"


def wants_ui(session) -> bool:
    """Start Forge WITH its UI (no --nowebui) when the browser check is among the selected tests:
    one Forge per session serves both (the API works the same with --api); API-only runs keep
    --nowebui (faster start, no gradio UI)."""
    return any(os.path.basename(str(it.fspath)) == BROWSER_MODULE for it in session.items)


@pytest.fixture(scope="session")
def webui(request):
    """The live Forge (a host_server.Server; the name is the A1111 tier's, see the module docstring).
    Extra attributes: `started_s` (launch to a ready API), `warmup_s` (first generation, incl. the
    model load), `ui` (started with its UI)."""
    src = forge_source()
    if src[0] is None:
        pytest.skip(src[1])
    tmp = None
    if src[0] == "url":
        w = S.Server(
            src[1],
            pid=int(os.environ["LR_FORGE_PID"]) if os.environ.get("LR_FORGE_PID") else None,
            log_path=os.environ.get("LR_FORGE_LOG") or None,
            what="Forge",
            env_prefix="LR_FORGE",
        )
        if not w.alive():
            raise RuntimeError(f"LR_FORGE_URL={src[1]} does not answer /sdapi/v1/sd-models")
    else:
        tmp = tempfile.mkdtemp(prefix="lr-forge-")
        try:
            w = start_forge(src[1], src[2], tmp, ui=wants_ui(request.session))
        except BaseException:
            if not os.environ.get("LR_FORGE_KEEP"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        w.read_titles()
        t0 = time.monotonic()
        r = H.txt2img(
            w.url,
            H.plain_body(
                "warm up", steps=2, override_settings={"sd_model_checkpoint": w.title(FC.PERSONAL)}
            ),
        )
        assert r.ok, f"Forge's first generation failed: {r.describe()}"
        w.warmup_s = time.monotonic() - t0
        yield w
    finally:
        S.stop(w)
        if tmp and not os.environ.get("LR_FORGE_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp:
            print(f"\nhost Forge folder kept: {tmp}")


@pytest.fixture(scope="session")
def url(webui) -> str:
    return webui.url


@pytest.fixture(scope="session")
def plain_before(webui):
    """The plain (extension off) image made before any enabled run (the bit-identity baseline)."""
    r = H.txt2img(webui.url, H.plain_body())
    assert r.ok, r.describe()
    return r


@pytest.fixture(scope="session")
def lr_defaults(webui, reference_b64) -> dict:
    """The A1111 tier's defaults with the Forge models: DreamBooth, forge-personal (loaded) vs
    forge-vanilla, 8 steps, λ1=2, λ2=3, mask start 6 taken literally, no SAM."""
    return H.default_lr(reference_b64, webui.title(FC.VANILLA))


@pytest.fixture(scope="session")
def forge_process():
    """(forge_dir, python, tiny models) for checks that run Forge's code in a process of their own
    (no server); skipped when attached to a running Forge by URL."""
    src = forge_source()
    if src[0] != "dir":
        pytest.skip(src[1] if src[0] is None else "needs LR_FORGE_DIR (a folder), not a URL")
    return src[1], src[2], build_flux_models(src[1], src[2])
