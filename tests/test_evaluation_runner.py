"""The protocol runner against a real HTTP server on loopback that speaks /sdapi/v1/txt2img, and the CLI."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.evaluation import diversity, runner, scoring
from lib_layout_retouch.evaluation.__main__ import main as cli_main
from tests.paths import HAS_VICO, VICO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_KEYS = {
    "enabled",
    "reference_image",
    "personalization",
    "vanilla_checkpoint",
    "concept_token",
    "class_phrase",
    "lambda1",
    "lambda2",
    "mask_start",
    "ca_threshold",
    "show_intermediates",
}  # + sam_model when set


# ------------------------------------------------------------------------------------ stand-in
def square_box(payload: dict) -> tuple[int, int, int]:
    """Where the stand-in draws its white subject square: (x, y, side), from seed, prompt and on/off."""
    w, h = payload["width"], payload["height"]
    side = max(2, min(w, h) // 4)
    on = script_enabled(payload)
    key = zlib.crc32(f"{payload['seed']}|{payload['prompt']}|{on}".encode())
    return key % (w - side), (key // 7919) % (h - side), side


def script_enabled(payload: dict) -> bool:
    scripts = payload.get("alwayson_scripts") or {}
    return bool(scripts and scripts["Layout-and-Retouch"]["args"][0]["enabled"])


def standin_image(payload: dict) -> Image.Image:
    seed = payload["seed"]
    img = Image.new(
        "RGB", (payload["width"], payload["height"]), ((seed * 37) % 200, (seed * 91) % 200, 60)
    )
    x, y, side = square_box(payload)
    img.paste((255, 255, 255), (x, y, x + side, y + side))
    return img


class StandIn:
    """A1111's txt2img API in miniature. Failure modes: `fail_next` transient 500s, `fail_after` 500s
    once that many images were served, `status` a fixed error code, `garbage` undecodable images."""

    def __init__(self):
        self.posts: list[dict] = []
        self.served = 0
        self.fail_next = 0
        self.fail_after: int | None = None
        self.status: int | None = None
        self.garbage = False
        self.script_runs = (
            True  # False: like a WebUI whose script raised (a plain image, no LR keys)
        )
        self.scripts = ["layout-and-retouch", "extra options"]
        self.die_after: int | None = (
            None  # after this many images: drop the request in hand and stop listening
        )
        self.delay = 0.0  # seconds per txt2img (lets requests overlap)
        self.served_keys: list[tuple] = []  # (prompt, seed, on) of every image sent
        self.active = self.max_active = 0
        self.lock = threading.RLock()  # re-entered: _post answers (and stops counting) under it
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                self._done()  # before the answer leaves: the client may send its next request at once
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/sdapi/v1/scripts":
                    self._send(200, {"txt2img": standin.scripts, "img2img": []})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with standin.lock:
                    standin.active += 1
                    standin.max_active = max(standin.max_active, standin.active)
                self._counted = True
                try:
                    time.sleep(standin.delay)
                    self._post(payload)
                finally:
                    self._done()

            def _done(self):
                # A request stops counting as in flight when its answer is sent (or it is dropped),
                # not when this handler thread gets round to finishing: under load that came after
                # the client's next request had arrived, and one-in-flight looked like two.
                if getattr(self, "_counted", False):
                    self._counted = False
                    with standin.lock:
                        standin.active -= 1

            def _post(self, payload):
                with standin.lock:
                    if standin.die_after is not None and standin.served >= standin.die_after:
                        self.close_connection = True  # no answer to this one, and no more listening
                        if not standin.dead:
                            standin.dead = True
                            threading.Thread(target=standin.close, daemon=True).start()
                        return
                    standin.posts.append(payload)
                    if self.path != "/sdapi/v1/txt2img" or standin.status == 404:
                        return self._send(404, {"detail": "Not Found"})
                    if standin.status:
                        return self._send(standin.status, {"detail": "stand-in says no"})
                    if standin.fail_next > 0:
                        standin.fail_next -= 1
                        return self._send(
                            500, {"error": "RuntimeError", "detail": "transient hiccup"}
                        )
                    if standin.fail_after is not None and standin.served >= standin.fail_after:
                        return self._send(
                            500, {"error": "OutOfMemoryError", "detail": "CUDA out of memory"}
                        )
                    scripts = payload.get("alwayson_scripts") or {}
                    for name in (
                        scripts
                    ):  # as A1111: titles match case-insensitively, unknown ones are refused
                        if name.lower() not in standin.scripts:
                            return self._send(422, {"detail": f"always on script {name} not found"})
                    if scripts:
                        args = scripts["Layout-and-Retouch"].get("args")
                        if not (
                            isinstance(args, list)
                            and len(args) == 1
                            and isinstance(args[0], dict)
                            and set(args[0]) - {"sam_model"} == SCRIPT_KEYS
                        ):
                            return self._send(422, {"detail": "alwayson_scripts args malformed"})
                    if standin.garbage:
                        return self._send(
                            200, {"images": ["bm90IGFuIGltYWdl"], "parameters": {}, "info": "{}"}
                        )
                    standin.served += 1
                    standin.served_keys.append(
                        (payload["prompt"], payload["seed"], script_enabled(payload))
                    )
                buf = io.BytesIO()
                standin_image(payload).save(buf, format="PNG")
                on = script_enabled(payload)
                infotext = (
                    f"{payload['prompt']}\nSteps: {payload['steps']}, Seed: {payload['seed']}"
                    + (", LR lambda1: 5, LR lambda2: 10" if on and standin.script_runs else "")
                )
                info = {
                    "seed": payload["seed"],
                    "all_seeds": [payload["seed"]],
                    "infotexts": [infotext],
                }
                self._send(
                    200,
                    {
                        "images": [base64.b64encode(buf.getvalue()).decode()],
                        "parameters": payload,
                        "info": json.dumps(info),
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    dead = False

    def close(self):
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin():
    s = StandIn()
    yield s
    s.close()


# ------------------------------------------------------------------------------------ data
@pytest.fixture
def vico(tmp_path):
    """A miniature ViCo folder: two concepts whose photos have odd sizes and modes."""
    root = tmp_path / "vico"
    dog, toy = root / "brown_dog", root / "cat-toy"
    dog.mkdir(parents=True)
    toy.mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(37, 53, 3) * 255).astype(np.uint8)).save(dog / "00.jpg")
    Image.fromarray((rng.rand(90, 20, 4) * 255).astype(np.uint8), "RGBA").save(dog / "03.png")
    Image.fromarray((rng.rand(31, 31) * 65535).astype(np.uint16)).save(
        toy / "1.png"
    )  # 16-bit greyscale
    Image.fromarray((rng.rand(12, 70) * 255).astype(np.uint8), "L").save(toy / "2.jpeg")
    (root / "imgs_source.txt").write_text(json.dumps({"brown_dog": "03.png", "cat-toy": "2.jpeg"}))
    (root / "prompts_live_objects.txt").write_text(
        "a {} in the jungle\na {} in the snow\na {} on the beach\n"
    )
    (root / "prompts_nonlive_objects.txt").write_text(
        "a {} on a table\n\na {} floating in a pond\n"
    )
    (root / "prompts_live_objects_challenging.txt").write_text("a {} jumping over a fence\n")
    (root / "prompts_nonlive_objects_challenging.txt").write_text("a {} bouncing on a trampoline\n")
    return root


@pytest.fixture
def concepts(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(
        json.dumps(
            {
                "defaults": {
                    "personalization": "dreambooth",
                    "vanilla_checkpoint": "tiny-vanilla.safetensors",
                },
                "concepts": {
                    "brown_dog": {
                        "token": "sks",
                        "class": "dog",
                        "checkpoint": "tiny-personal.safetensors",
                    },
                    "cat_statue": {
                        "folder": "cat-toy",
                        "token": "<cat-toy>",
                        "class": "cat statue",
                        "subject": "<cat-toy>",
                        "personalization": "textual_inversion",
                        "lambda1": 4,
                    },
                },
            }
        )
    )
    return path


def small_settings(**kw) -> runner.RunSettings:
    base = dict(n=2, n_prompts=2, steps=4, width=64, height=48, seed=100)
    base.update(kw)
    return runner.RunSettings(**base)


def fast_client(url: str, retries: int = 2, sleeps: list | None = None) -> runner.WebUIClient:
    return runner.WebUIClient(
        url,
        timeout=10,
        retries=retries,
        backoff=0.5,
        sleep=(sleeps.append if sleeps is not None else (lambda s: None)),
    )


def protocol(vico, concepts, urls, out, settings=None, *, retries=2, sleeps=None, **kw):
    """`runner.run_protocol` as these tests run it: `settings` (default `small_settings()`), one
    fast client per WebUI (`urls`: one URL, or a list of them), no progress bar unless `kw` says
    (`kw`: run_protocol's other arguments)."""
    if isinstance(urls, list):
        client = [fast_client(u, retries, sleeps) for u in urls]
    else:
        client = fast_client(urls, retries, sleeps)
    kw.setdefault("progress", False)
    settings = settings or small_settings()
    return runner.run_protocol(
        str(vico), str(concepts), urls, str(out), settings, client=client, **kw
    )


def pngs(out) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(os.path.join(out, "images")):
        found += [
            os.path.join(dirpath, f)
            for f in files
            if f.endswith(".png") and not f.endswith(".mask.png")
        ]
    return sorted(found)


# ------------------------------------------------------------------------------------ tests
def test_concepts_and_prompts_are_read_from_the_vico_layout(vico, concepts):
    specs = {s.name: s for s in runner.load_concepts(str(concepts), str(vico))}
    dog, toy = specs["brown_dog"], specs["cat_statue"]
    assert dog.live and not toy.live
    assert dog.reference_image.endswith(os.path.join("brown_dog", "03.png"))  # imgs_source.txt
    assert (
        toy.folder.endswith("cat-toy") and toy.subject == "<cat-toy>" and dog.subject == "sks dog"
    )
    assert toy.script == {"vanilla_checkpoint": "tiny-vanilla.safetensors", "lambda1": 4}
    assert runner.read_prompts(str(vico), True) == [
        "a {} in the jungle",
        "a {} in the snow",
        "a {} on the beach",
    ]
    assert runner.read_prompts(str(vico), False) == ["a {} on a table", "a {} floating in a pond"]
    assert runner.read_prompts(str(vico), False, "challenging") == ["a {} bouncing on a trampoline"]


def test_reference_defaults_to_the_first_image_without_imgs_source(vico, concepts):
    os.remove(vico / "imgs_source.txt")
    specs = {s.name: s for s in runner.load_concepts(str(concepts), str(vico))}
    assert os.path.basename(specs["brown_dog"].reference_image) == "00.jpg"


@pytest.mark.skipif(not HAS_VICO, reason="the shared ViCo copy is not here")
def test_the_real_vico_folder_reads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "brown_dog": {"token": "sks", "class": "dog"},
                "cat_statue": {"folder": "cat-toy", "token": "sks", "class": "cat statue"},
            }
        )
    )
    specs = {s.name: s for s in runner.load_concepts(str(path), str(VICO))}
    assert os.path.basename(specs["cat_statue"].reference_image) == "2.jpeg"
    assert specs["brown_dog"].live and len(runner.read_prompts(str(VICO), True)) >= 25
    assert len(runner.read_prompts(str(VICO), False, "challenging")) >= 20


def test_payload_carries_the_named_script_arguments(vico, concepts):
    specs = {s.name: s for s in runner.load_concepts(str(concepts), str(vico))}
    ref = runner.encode_reference(specs["brown_dog"].reference_image, max_side=40)
    on = runner.build_payload(
        specs["brown_dog"], "a {} in the snow", 7, "on", small_settings(), ref
    )
    off = runner.build_payload(
        specs["brown_dog"], "a {} in the snow", 7, "off", small_settings(), ref
    )
    args_on = on["alwayson_scripts"]["Layout-and-Retouch"]["args"]
    assert len(args_on) == 1 and set(args_on[0]) == SCRIPT_KEYS
    a = args_on[0]
    assert a["enabled"] is True and a["show_intermediates"] is True  # for the pipeline's mask
    assert (a["personalization"], a["concept_token"], a["class_phrase"]) == (
        "dreambooth",
        "sks",
        "dog",
    )
    assert (a["lambda1"], a["lambda2"], a["mask_start"], a["ca_threshold"]) == (5, 10, 31, 0.1)
    assert a["vanilla_checkpoint"] == "tiny-vanilla.safetensors"
    assert not a["reference_image"].startswith("data:")
    with Image.open(io.BytesIO(base64.b64decode(a["reference_image"]))) as im:
        assert (
            im.format == "PNG" and max(im.size) == 40
        )  # capped longest side, aspect kept (20x90 -> 9x40)
        assert im.size == (9, 40)
    assert on["prompt"] == off["prompt"] == "a sks dog in the snow"
    assert on["seed"] == off["seed"] == 7
    assert on["override_settings"] == {"sd_model_checkpoint": "tiny-personal.safetensors"}
    b = off["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]
    assert b["enabled"] is False and b["reference_image"] == ""
    assert {k: v for k, v in on.items() if k != "alwayson_scripts"} == {
        k: v for k, v in off.items() if k != "alwayson_scripts"
    }
    toy = runner.build_payload(
        specs["cat_statue"],
        "a {} on a table",
        1,
        "on",
        small_settings(prompt_set="challenging"),
        ref,
    )
    assert (
        toy["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]["lambda1"] == 4
    )  # concept override
    assert "override_settings" not in toy and toy["prompt"] == "a <cat-toy> on a table"
    chall = runner.build_payload(
        specs["brown_dog"], "a {}", 1, "on", small_settings(prompt_set="challenging"), ref
    )
    assert (
        chall["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]["lambda1"] == 3
    )  # paper: 3 for challenging


def test_run_stops_with_what_is_done_kept_then_resumes(vico, concepts, tmp_path, standin):
    out = tmp_path / "out"
    standin.fail_after = 5
    sleeps = []
    with pytest.raises(LayoutRetouchError) as err:
        protocol(vico, concepts, standin.url, out, retries=2, sleeps=sleeps)
    msg = str(err.value)
    assert "5 of 16 images are saved" in msg and "run the same command again to resume" in msg
    assert "CUDA out of memory" in msg and "gave up after 3 attempts" in msg
    assert sleeps == [0.5, 1.0]  # exponential backoff between the three attempts
    assert len(standin.posts) == 5 + 3
    done = pngs(out)
    assert len(done) == 5
    assert all(os.path.isfile(p[:-4] + ".json") for p in done)
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]  # no half-written files

    standin.fail_after = None
    before = len(standin.posts)
    summary = protocol(vico, concepts, standin.url, out)
    assert (summary.total, summary.skipped, summary.generated) == (16, 5, 11)
    assert len(standin.posts) - before == 11  # only the missing images were asked for
    assert len(pngs(out)) == 16 and not summary.warnings

    # on and off share seeds and prompts; the sidecars say what each image is
    metas = [json.load(open(p[:-4] + ".json")) for p in pngs(out)]
    keys = {m["method"]: set() for m in metas}
    for m in metas:
        keys[m["method"]].add((m["concept"], m["prompt_index"], m["seed"], m["prompt"]))
    assert keys["on"] == keys["off"] and len(keys["on"]) == 8
    assert {m["seed"] for m in metas} == {100, 101}
    assert all(m["info_seed"] == m["seed"] for m in metas)
    assert all(m["script_ran"] is True for m in metas if m["method"] == "on")
    # the saved image is the server's image for that request, byte for byte in pixels
    p = str(out / "images" / "on" / "brown_dog" / "p01_s101.png")
    req = next(
        q
        for q in standin.posts
        if q["seed"] == 101
        and q["prompt"] == "a sks dog in the snow"
        and q["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]["enabled"]
    )
    assert np.array_equal(np.asarray(Image.open(p)), np.asarray(standin_image(req)))

    # nothing left to do: no requests at all
    before = len(standin.posts)
    again = protocol(vico, concepts, standin.url, out)
    assert again.generated == 0 and again.skipped == 16 and len(standin.posts) == before


def test_transient_errors_are_retried_with_backoff(vico, concepts, tmp_path, standin):
    standin.fail_next = 2
    sleeps = []
    summary = protocol(
        vico,
        concepts,
        standin.url,
        tmp_path / "o",
        small_settings(n=1, n_prompts=1, methods=("on",)),
        retries=3,
        sleeps=sleeps,
    )
    assert summary.generated == 2 and sleeps == [0.5, 1.0]
    assert len(standin.posts) == 4


def test_webui_down_is_a_clear_message(vico, concepts, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(LayoutRetouchError) as err:
        protocol(vico, concepts, url, tmp_path / "o", retries=1)
    assert "could not reach the WebUI" in str(err.value) and "--api" in str(err.value)
    assert "0 of 16 images" in str(err.value)
    with pytest.raises(LayoutRetouchError, match="could not reach"):
        protocol(vico, concepts, url, tmp_path / "o", small_settings(methods=("off",)), retries=0)


def test_api_not_enabled_fails_at_once_without_retries(vico, concepts, tmp_path, standin):
    standin.status = 404
    with pytest.raises(LayoutRetouchError, match="--api"):
        protocol(
            vico, concepts, standin.url, tmp_path / "o", small_settings(methods=("off",)), retries=3
        )
    assert len(standin.posts) == 1


def test_missing_extension_is_reported_before_generating(vico, concepts, tmp_path, standin):
    standin.scripts = ["extra options"]
    with pytest.raises(LayoutRetouchError, match="install and enable the extension"):
        protocol(vico, concepts, standin.url, tmp_path / "o")
    assert standin.posts == []
    # The baseline alone can still be made: without the script in the request (A1111 would answer 422).
    s = protocol(
        vico,
        concepts,
        standin.url,
        tmp_path / "o",
        small_settings(n=1, n_prompts=1, methods=("off",)),
        log=lambda m: None,
    )
    assert s.generated == 2 and "sent without it" in s.warnings[0]
    assert all("alwayson_scripts" not in p for p in standin.posts)


def test_unreadable_images_in_replies_are_retried_then_reported(vico, concepts, tmp_path, standin):
    standin.garbage = True
    with pytest.raises(LayoutRetouchError, match="unreadable"):
        protocol(vico, concepts, standin.url, tmp_path / "o", retries=1)
    assert len(standin.posts) == 2 and pngs(tmp_path / "o") == []


def test_other_settings_in_the_same_folder_are_refused(vico, concepts, tmp_path, standin):
    out = str(tmp_path / "o")
    protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1))
    with pytest.raises(LayoutRetouchError, match="steps: 4 before, 6 now"):
        protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1, steps=6))
    # more images / prompts with the same settings extend the run
    s = protocol(vico, concepts, standin.url, out, small_settings(n=2, n_prompts=1))
    assert (s.skipped, s.generated) == (4, 4)


def test_a_broken_image_is_kept_aside_and_made_again(vico, concepts, tmp_path, standin):
    out = tmp_path / "o"
    protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1))
    victim = pngs(out)[0]
    with open(victim, "r+b") as f:
        f.truncate(30)
    s = protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1))
    assert s.generated == 1 and os.path.isfile(victim + ".broken")
    Image.open(victim).verify()


def test_bad_inputs_have_clear_messages(vico, concepts, tmp_path, standin):
    def run(v=vico, c=concepts, **kw):
        return protocol(v, c, standin.url, tmp_path / "o", small_settings(**kw))

    with pytest.raises(LayoutRetouchError, match="ViCo folder .* does not exist"):
        run(v=tmp_path / "nowhere")
    with pytest.raises(LayoutRetouchError, match="Concept file .* does not exist"):
        run(c=tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayoutRetouchError, match="not valid JSON"):
        run(c=bad)
    for content, pattern in (
        ({"brown_dog": {"class": "dog"}}, "needs a non-empty 'token'"),
        (
            {"barn": {"token": "sks", "class": "barn"}},
            'folder .* does not exist. Set "folder" to one of: brown_dog, cat-toy',
        ),
        ({"brown_dog": {"token": "sks", "class": "dog", "lambda_1": 5}}, "Unknown key"),
        (
            {"brown_dog": {"token": "sks", "class": "dog", "personalization": "hypernetwork"}},
            "personalization",
        ),
        (
            {"brown_dog": {"token": "sks", "class": "dog", "reference_image": "nope.jpg"}},
            "reference image",
        ),
        ({}, "names no concepts"),
    ):
        bad.write_text(json.dumps(content))
        with pytest.raises(LayoutRetouchError, match=pattern):
            run(c=bad)
    os.remove(vico / "prompts_nonlive_objects.txt")
    with pytest.raises(LayoutRetouchError, match="prompts_nonlive_objects.txt is missing"):
        run()
    with pytest.raises(LayoutRetouchError, match="methods"):
        run(methods=("on", "sideways"))
    with pytest.raises(LayoutRetouchError, match="--width 60: .* multiple of 8"):
        run(width=60)
    with pytest.raises(LayoutRetouchError, match="http://"):
        runner.WebUIClient("127.0.0.1:7860")
    (vico / "brown_dog" / "03.png").write_bytes(
        b"garbage"
    )  # the reference photo: caught before any request
    (vico / "prompts_nonlive_objects.txt").write_text("a {} on a table\n")
    with pytest.raises(LayoutRetouchError, match="Cannot read image .*03.png"):
        run()
    assert standin.posts == []


def test_a_script_that_did_not_run_stops_the_run(vico, concepts, tmp_path, standin):
    standin.script_runs = False  # the WebUI swallowed the script's error and sent a plain image
    out = tmp_path / "o"
    with pytest.raises(LayoutRetouchError, match="Layout-and-Retouch did not run") as err:
        protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1))
    assert "1 of 4 are in" in str(
        err.value
    )  # the "off" image before it is kept, the bad "on" one is not
    assert [os.path.basename(os.path.dirname(os.path.dirname(p))) for p in pngs(out)] == ["off"]
    s = protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1, on_marker=""))
    assert s.generated == 3


def test_sam_model_is_sent_only_when_chosen(vico, concepts):
    spec = runner.load_concepts(str(concepts), str(vico))[0]
    args = runner.build_payload(spec, "a {}", 1, "on", small_settings(), "")["alwayson_scripts"]
    assert (
        "sam_model" not in args["Layout-and-Retouch"]["args"][0]
    )  # the extension's default applies
    args = runner.build_payload(
        spec, "a {}", 1, "on", small_settings(sam_model="sam_vit_b.pth"), ""
    )
    assert args["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]["sam_model"] == "sam_vit_b.pth"


# ------------------------------------------------------------------------------------ CLI end to end
def _write_masks_from_white_squares(out) -> dict:
    """A subject mask beside each image (the white square); returns the expected centres per method/concept."""
    expected = {}
    for p in pngs(out):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        mask = (rgb > 250).all(axis=-1)
        Image.fromarray(mask.astype(np.uint8) * 255).save(diversity.mask_path_for(p))
        meta = json.load(open(p[:-4] + ".json"))
        req = {
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "seed": meta["seed"],
            "prompt": meta["prompt"],
            "alwayson_scripts": {
                "Layout-and-Retouch": {"args": [{"enabled": meta["method"] == "on"}]}
            },
        }
        x, y, side = square_box(req)
        expected.setdefault((meta["method"], meta["concept"]), []).append(
            ((x + side / 2) / rgb.shape[1], (y + side / 2) / rgb.shape[0])
        )
    return expected


def test_cli_run_then_score_writes_the_tables_and_heat_maps(vico, concepts, tmp_path, standin):
    out = tmp_path / "results"
    common = [
        "--vico",
        str(vico),
        "--concepts",
        str(concepts),
        "--url",
        standin.url,
        "--out",
        str(out),
        "--n",
        "2",
        "--prompts",
        "2",
        "--steps",
        "4",
        "--width",
        "64",
        "--height",
        "48",
        "--seed",
        "100",
        "--backoff",
        "0",
        "--no-progress",
    ]
    assert cli_main(["run", *common, "--no-score"]) == 0
    assert len(pngs(out)) == 16
    expected = _write_masks_from_white_squares(out)

    rc = cli_main(
        [
            "score",
            "--out",
            str(out),
            "--random-models",
            "--imagereward",
            "none",
            "--no-progress",
            "--is-splits",
            "2",
        ]
    )
    assert rc == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"off", "on"}
    per_concept = {
        (r["method"], r["concept"]): r
        for r in csv.DictReader(open(out / "results_per_concept.csv"))
    }
    for (method, concept), pts in expected.items():
        assert float(per_concept[(method, concept)]["sigma2_avg"]) == pytest.approx(
            diversity.sigma2_avg(pts), abs=1e-6
        )
        assert int(per_concept[(method, concept)]["centres"]) == 4
    for method in ("off", "on"):
        r = rows[method]
        want = np.mean(
            [diversity.sigma2_avg(expected[(method, c)]) for c in ("brown_dog", "cat_statue")]
        )
        assert float(r["sigma2_avg"]) == pytest.approx(want, abs=1e-6)
        assert r["images"] == "8" and r["concepts"] == "2"
        for col in ("I_DINO", "I_CLIP", "T_CLIP_class", "T_CLIP_keep"):
            assert -1.0 <= float(r[col]) <= 1.0
        assert r["T_CLIP"] == r["T_CLIP_class"]  # default mode
        assert 1.0 <= float(r["IS"]) <= 4.0 + 1e-6 and r["IS_splits"] == "2"
        assert r["ImageReward"] == ""  # n/a
        assert os.path.isfile(out / "heatmaps" / f"{method}.png")
        assert os.path.isfile(out / "heatmaps" / f"{method}__brown_dog.png")
    md = (out / "results.md").read_text()
    assert "| method | I_DINO | I_CLIP | T_CLIP | ImageReward | IS | σ²_avg |" in md
    assert "| Layout-and-Retouch (on) |" in md and "n/a" in md and "RANDOM WEIGHTS" in md
    assert "ImageReward n/a: skipped (--imagereward none)" in md
    assert "CLIP input resize (dreammatcher): bicubic without antialiasing" in md
    per_prompt = list(csv.DictReader(open(out / "results_per_prompt.csv")))
    assert len(per_prompt) == 8 and {r["template"] for r in per_prompt} >= {
        "a {} in the jungle",
        "a {} on a table",
    }

    # T_CLIP in "keep" mode is DreamMatcher's number, and the other column of the same CSV
    assert (
        cli_main(
            [
                "score",
                "--out",
                str(out),
                "--random-models",
                "--imagereward",
                "none",
                "--no-progress",
                "--tclip-mode",
                "keep",
                "--inception",
                "none",
                "--clip",
                "none",
            ]
        )
        == 0
    )
    rows2 = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert "CLIP input resize" not in (out / "results.md").read_text()  # no CLIP, nothing to say
    assert rows2["on"]["T_CLIP"] == rows2["on"]["T_CLIP_keep"] == ""  # --clip none -> n/a
    assert float(rows2["on"]["I_DINO"]) == pytest.approx(float(rows["on"]["I_DINO"]), abs=1e-6)
    assert (
        rows2["on"]["IS"] == ""
        and "I_CLIP/T_CLIP n/a: skipped (--clip none)" in (out / "results.md").read_text()
    )


def test_score_arithmetic_with_injected_embedders_follows_dreammatcher(
    vico, concepts, tmp_path, standin
):
    """Stub embedders with known outputs: I/T per prompt, mean over prompts, then concepts; ImageReward too."""
    out = tmp_path / "o"
    protocol(vico, concepts, standin.url, out, small_settings(n=2, n_prompts=2))

    class Stub:  # image embedding: e0 for reference photos (odd sizes), e0/e1 by seed for generated images
        preprocess_mode = "stub"

        def embed_images(self, images):
            import torch

            rows = []
            for im in images:
                if im.size == (64, 48):
                    seed_colour = (
                        im.getpixel((0, 0))[0]
                        if (im.getpixel((0, 0)) != (255, 255, 255))
                        else im.getpixel((63, 47))[0]
                    )
                    rows.append([1.0, 0.0] if seed_colour == (100 * 37) % 200 else [0.0, 1.0])
                else:
                    rows.append([1.0, 0.0])
            return torch.tensor(rows)

        def embed_texts(self, texts):
            import torch

            return torch.tensor([[1.0, 0.0] if "{}" in t else [0.6, 0.8] for t in texts])

    calls = []

    def reward(prompt, images):
        calls.append(prompt)
        return [2.0 if "jungle" in prompt else 1.0 for _ in images]

    stub = Stub()
    rep = scoring.score_run(
        str(out), scoring.Scorers(clip=stub, dino=stub, image_reward=reward), progress=False
    )
    on = next(r for r in rep.rows if r["method"] == "on")
    # seed 100 -> e0 (cos 1 with every reference), seed 101 -> e1 (cos 0): mean 0.5 at every level
    assert on["I_DINO"] == pytest.approx(0.5) and on["I_CLIP"] == pytest.approx(0.5)
    assert on["T_CLIP_keep"] == pytest.approx(0.5)  # text e0 -> (1 + 0)/2
    assert on["T_CLIP_class"] == pytest.approx(0.7) == on["T_CLIP"]  # text (.6,.8) -> (.6 + .8)/2
    # ImageReward: brown_dog prompts (jungle 2, snow 1) -> 1.5; cat_statue (table, pond) -> 1; mean 1.25
    assert on["ImageReward"] == pytest.approx(1.25)
    assert "a dog in the jungle" in calls and not any("{}" in c for c in calls)
    assert np.isnan(on["IS"]) and np.isnan(on["sigma2_avg"])
    assert any("σ²_avg n/a" in n for n in rep.notes)


def test_unpaired_images_are_left_out_by_default(vico, concepts, tmp_path, standin):
    out = tmp_path / "o"
    protocol(vico, concepts, standin.url, out, small_settings(n=1, n_prompts=1))
    extra = out / "images" / "on" / "brown_dog"
    Image.new("RGB", (64, 48)).save(extra / "p05_s9.png")
    (extra / "p05_s9.json").write_text(
        json.dumps({"template": "a {} alone", "class": "dog", "prompt_index": 5, "seed": 9})
    )

    class Unit:
        preprocess_mode = "stub"

        def embed_images(self, images):
            import torch

            return torch.ones(len(images), 2)

    rep = scoring.score_run(str(out), scoring.Scorers(dino=Unit()), progress=False)
    assert {r["method"]: r["images"] for r in rep.rows} == {"off": 2, "on": 2}
    assert any("without a counterpart" in n for n in rep.notes)
    rep = scoring.score_run(
        str(out), scoring.Scorers(dino=Unit()), scoring.ScoreOptions(paired=False), progress=False
    )
    assert {r["method"]: r["images"] for r in rep.rows} == {"off": 2, "on": 3}


def test_cli_module_entry_point_reports_errors_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lib_layout_retouch.evaluation",
            "score",
            "--out",
            str(tmp_path / "nothing"),
            "--random-models",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: Layout-and-Retouch:" in proc.stderr and "images" in proc.stderr
    assert "Traceback" not in proc.stderr


def _png_b64(value: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_pipeline_mask_is_the_third_image_of_an_on_reply(vico, concepts):
    specs = {s.name: s for s in runner.load_concepts(str(concepts), str(vico))}
    on = runner.build_payload(specs["brown_dog"], "a {}", 1, "on", small_settings(), "")
    off = runner.build_payload(specs["brown_dog"], "a {}", 1, "off", small_settings(), "")
    reply = {"images": [_png_b64(10), _png_b64(20), _png_b64(200), _png_b64(30)]}
    mask = runner.pipeline_mask(reply, on)
    with Image.open(io.BytesIO(mask)) as im:
        assert im.getpixel((0, 0)) == 200
    assert runner.pipeline_mask(reply, off) is None  # no mask for OFF
    assert (
        runner.pipeline_mask({"images": reply["images"][:1]}, on) is None
    )  # WebUI sent no intermediates
    quiet = runner.build_payload(
        specs["brown_dog"], "a {}", 1, "on", small_settings(keep_masks=False), ""
    )
    assert quiet["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]["show_intermediates"] is False
    assert runner.pipeline_mask(reply, quiet) is None


# ------------------------------------------------------------------------------- several WebUIs
@pytest.fixture
def three_standins():
    servers = [StandIn() for _ in range(3)]
    yield servers
    for s in servers:
        s.close()


def two_checkpoint_concepts(tmp_path) -> str:
    path = tmp_path / "concepts2.json"
    path.write_text(
        json.dumps(
            {
                "concepts": {
                    "brown_dog": {
                        "token": "sks",
                        "class": "dog",
                        "checkpoint": "dog.safetensors",
                        "vanilla_checkpoint": "v",
                    },
                    "cat_statue": {
                        "folder": "cat-toy",
                        "token": "sks",
                        "class": "cat statue",
                        "checkpoint": "cat.safetensors",
                        "vanilla_checkpoint": "v",
                    },
                }
            }
        )
    )
    return str(path)


def test_a_sweep_over_three_webuis_one_dying_makes_every_image_exactly_once(
    vico, tmp_path, three_standins, capsys
):
    a, b, c = three_standins
    b.die_after = 3  # serves three images, then drops a request and stops listening
    for s in three_standins:
        s.delay = 0.02
    out = tmp_path / "out"
    settings = small_settings(
        n=3, n_prompts=2
    )  # 2 concepts x 2 prompts x 3 seeds x on/off = 24 images
    summary = protocol(
        vico,
        two_checkpoint_concepts(tmp_path),
        [s.url for s in three_standins],
        out,
        settings,
        retries=1,
        progress=True,
    )
    assert (summary.total, summary.generated, summary.skipped) == (24, 24, 0)
    served = a.served_keys + b.served_keys + c.served_keys
    assert len(served) == len(set(served)) == 24  # every image made exactly once, none twice
    assert len(b.served_keys) == 3 and b.dead and a.served_keys and c.served_keys
    assert len(pngs(out)) == 24
    metas = [json.load(open(p[:-4] + ".json")) for p in pngs(out)]
    assert {m["webui"] for m in metas} == {a.url, b.url, c.url}
    for s in three_standins:
        assert s.max_active == 1  # one request in flight per server by default
    cap = capsys.readouterr()
    err = cap.out + cap.err  # tqdm.write's note on stdout, the bar on stderr
    assert f"{b.url} stopped answering" in err and "its requests go to the other 2 WebUI(s)" in err
    assert "24/24" in err and "<" in err  # the progress bar, with its ETA

    # resumable: nothing left, nothing asked
    before = [len(s.posts) for s in (a, c)]
    again = protocol(vico, two_checkpoint_concepts(tmp_path), [a.url, c.url], out, settings)
    assert again.generated == 0 and again.skipped == 24 and [len(s.posts) for s in (a, c)] == before


def test_each_checkpoint_stays_on_the_webui_that_has_it_loaded(vico, tmp_path, three_standins):
    a, b, c = three_standins
    for s in (a, b):
        s.delay = 0.02
    protocol(
        vico,
        two_checkpoint_concepts(tmp_path),
        [a.url, b.url],
        tmp_path / "o",
        small_settings(n=4, n_prompts=2),
    )
    runs = []
    for s in (a, b):
        ckpts = [p["override_settings"]["sd_model_checkpoint"] for p in s.posts]
        switches = sum(x != y for x, y in zip(ckpts, ckpts[1:]))
        assert switches <= 1, ckpts  # its own concept first; at most one switch to help at the end
        runs.append(ckpts[0])
    assert sorted(runs) == [
        "cat.safetensors",
        "dog.safetensors",
    ]  # one concept per WebUI to begin with

    # --per-server 2: two requests in flight on a WebUI, never more
    c.delay = 0.1
    protocol(
        vico,
        two_checkpoint_concepts(tmp_path),
        [c.url],
        tmp_path / "o2",
        small_settings(n=2, n_prompts=1),
        per_server=2,
    )
    assert c.max_active == 2 and len(c.served_keys) == 8


def test_when_every_webui_stops_the_run_stops_cleanly_and_resumes(
    vico, concepts, tmp_path, three_standins
):
    a, b, c = three_standins
    for s, k in ((a, 2), (b, 3), (c, 1)):
        s.die_after = k
    out = tmp_path / "out"
    with pytest.raises(LayoutRetouchError) as err:
        protocol(vico, concepts, [s.url for s in three_standins], out, retries=1)
    msg = str(err.value)
    assert "All 3 WebUIs stopped answering" in msg and "6 of 16 images are saved" in msg
    assert "run the same command again to resume" in msg
    assert len(pngs(out)) == 6 and not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]
    fresh = StandIn()
    try:
        s = protocol(vico, concepts, [fresh.url], out)
    finally:
        fresh.close()
    assert (s.generated, s.skipped) == (10, 6) and len(fresh.served_keys) == 10
