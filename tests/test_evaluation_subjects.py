"""The several-subjects protocol (evaluation/subjects_runner.py, subjects_scoring.py, regions.py):
pairs of concepts, two-subject prompts from ViCo's templates, one request per image with the
script's `subjects` list, each subject's region read back from the extension's regions picture,
identity in each region against its own and the other subject's photos, identity collapse.

The stand-in WebUI paints each subject's square in the mean colour of its own reference photo —
except where the test asks it to blend identities (subject 2 painted in subject 1's colour) or to
leave subject 2 out of the layout — and returns the regions picture the extension returns
(`job.regions_to_image`, one colour per subject) as an intermediate. The stub embedders see colour
only, so every identity, collapse and missing figure has an exact expected value."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.evaluation import regions as regions_mod
from lib_layout_retouch.evaluation import runner, subjects_runner, subjects_scoring
from lib_layout_retouch.evaluation.__main__ import main as cli_main
from lib_layout_retouch.evaluation.scoring import Scorers
from lib_layout_retouch.job import SUBJECT_COLOURS, regions_to_image
from lib_layout_retouch.params import SUBJECT_KEYS
from lib_layout_retouch.ui_text import INTERMEDIATE_KEY

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
BLEND_SEED = 101  # subject 2 is painted with subject 1's identity
MISSING = ("snow", 100)  # (prompt word, seed): subject 2 is not in the layout


# ------------------------------------------------------------------------------------ stand-in
def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def draw(payload: dict) -> tuple[Image.Image, Image.Image | None, str]:
    """(the image, its regions picture or None, its infotext) for one request."""
    w, h, seed, prompt = payload["width"], payload["height"], payload["seed"], payload["prompt"]
    args = (payload.get("alwayson_scripts") or {}).get("Layout-and-Retouch", {}).get("args")
    script = args[0] if args else {}
    image = Image.new("RGB", (w, h), (200, 200, 200))
    index = torch.full((h, w), -1, dtype=torch.long)
    side = h // 2
    on = bool(script.get("enabled"))
    subjects = script.get("subjects") or []
    colours = []
    for subject in subjects:
        if on:
            photo = np.asarray(_decode(subject["reference_image"]), dtype=np.float64)
            colours.append(tuple(int(round(c)) for c in photo.reshape(-1, 3).mean(0)))
        else:
            colours.append(GREEN)  # the vanilla model: nobody's identity
    if on and seed == BLEND_SEED:
        colours[1] = colours[0]
    for k, colour in enumerate(colours):
        if on and k == 1 and MISSING[0] in prompt and seed == MISSING[1]:
            continue
        x = 4 + k * (w // 2)
        image.paste(colour, (x, 4, x + side, 4 + side))
        index[4 : 4 + side, x : x + side] = k
    infotext = f"{prompt}\nSteps: {payload['steps']}, Seed: {seed}"
    if on:
        infotext += ", LR lambda1: 5" + "".join(
            f", LR subject {k + 1} class phrase: {s['class_phrase']}"
            for k, s in enumerate(subjects[1:], 1)
        )
    regions = regions_to_image(index, (w, h)) if on and script.get("show_intermediates") else None
    return image, regions, infotext


class StandIn:
    """/sdapi/v1/txt2img and /sdapi/v1/scripts, as the extension answers with several subjects."""

    def __init__(self):
        self.posts: list[dict] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"txt2img": ["layout-and-retouch"], "img2img": []})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.posts.append(payload)
                image, regions, infotext = draw(payload)
                images, infotexts = [_png_b64(image)], [infotext]
                if regions is not None:  # a grey mask first, as the other intermediates come
                    images.append(_png_b64(Image.new("RGB", image.size, (90, 90, 90))))
                    infotexts.append(f'{INTERMEDIATE_KEY}: "layout"')
                    images.append(_png_b64(regions))
                    infotexts.append(f'{INTERMEDIATE_KEY}: "subject regions"')
                info = {"seed": payload["seed"], "infotexts": infotexts}
                self._send(200, {"images": images, "parameters": {}, "info": json.dumps(info)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self):
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
    """Two non-live concepts whose photos are one colour each (red box, blue vase)."""
    root = tmp_path / "vico"
    for name, colour in (("red_box", RED), ("blue_vase", BLUE)):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(((24, 30), (41, 17))):
            Image.new("RGB", size, colour).save(root / name / f"{i}.png")
    # Only "on a table" and "in the snow" fit two subjects: "a red {}" puts an attribute before
    # the subject and "wearing" dresses it.
    (root / "prompts_nonlive_objects.txt").write_text(
        "a red {}\na {} on a table\na {} wearing a hat\na {} in the snow\n"
    )
    (root / "prompts_live_objects.txt").write_text("a {} in the jungle\n")
    return root


@pytest.fixture
def concepts(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(
        json.dumps(
            {
                "defaults": {"vanilla_checkpoint": "v1-5.safetensors"},
                "concepts": {
                    "red_box": {"class": "box", "personalization": "photo"},
                    "blue_vase": {
                        "token": "zwx",
                        "class": "vase",
                        "personalization": "lora",
                        "prompt_extra": "<lora:blue_vase_v2:0.8>",
                    },
                },
            }
        )
    )
    return path


def settings(**kw) -> runner.RunSettings:
    return runner.RunSettings(**{**dict(n=2, steps=4, width=64, height=48, seed=100), **kw})


def client(url: str) -> runner.WebUIClient:
    return runner.WebUIClient(url, timeout=10, retries=1, backoff=0, sleep=lambda s: None)


class ColourStub:
    """An embedder that sees colour only: red-dominant → e0, blue-dominant → e1, else (the
    vanilla model's green, a text) → (0.6, 0.8)."""

    preprocess_mode = "stub"

    def embed_images(self, images):
        rows = []
        for im in images:
            a = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
            red = int(((a[:, 0] > 200) & (a[:, 2] < 50)).sum())
            blue = int(((a[:, 2] > 200) & (a[:, 0] < 50)).sum())
            rows.append([1.0, 0.0] if red > blue else [0.0, 1.0] if blue > red else [0.6, 0.8])
        return torch.tensor(rows)

    def embed_texts(self, texts):
        return torch.tensor([[0.6, 0.8] for _ in texts])


def _run(vico, concepts, out, standin, **kw):
    return subjects_runner.run_subjects_protocol(
        str(vico),
        str(concepts),
        standin.url,
        str(out),
        settings(**kw),
        client=client(standin.url),
        progress=False,
    )


# ------------------------------------------------------------------------------------ tests
def test_templates_and_pairs():
    t = subjects_runner.subject_template
    assert t("a {} in the snow") == "a {} and a {} in the snow"
    assert t("a {}  on a table", 3) == "a {}, a {} and a {} on a table"
    assert t("a red {}") is None and t("a {} wearing a red hat") is None
    assert t("a {} in a chef outfit") is None
    tpl = "a {} and a {} in the snow"
    assert (
        subjects_runner.fill_template(tpl, ["box", "zwx vase"])
        == "a box and a zwx vase in the snow"
    )
    dog = runner.ConceptSpec("a", "/a", "sks", "dog", "sks dog", "/a/0.png")
    dog2 = runner.ConceptSpec("b", "/b", "zwx", "dog", "zwx dog", "/b/0.png")
    cat = runner.ConceptSpec("c", "/c", "sks", "cat", "sks cat", "/c/0.png")
    groups, notes = subjects_runner._every_pair([dog, dog2, cat])
    assert [g.name for g in groups] == ["b+c"] and len(notes) == 2
    assert "class phrase 'dog'" in notes[0] and "'white dog' and 'brown dog'" in notes[0]
    assert "concept token 'sks'" in notes[1]


def test_each_request_carries_every_subject_and_keeps_the_regions_picture(
    vico, concepts, tmp_path, standin
):
    out = tmp_path / "out"
    summary = _run(vico, concepts, out, standin)
    assert summary.generated == 8 and summary.total == 8  # 2 prompts × 2 seeds × off/on
    on = [
        p
        for p in standin.posts
        if p["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]["enabled"]
    ]
    assert len(on) == 4
    prompts = {p["prompt"] for p in on}
    assert prompts == {
        "a box and a zwx vase on a table <lora:blue_vase_v2:0.8>",
        "a box and a zwx vase in the snow <lora:blue_vase_v2:0.8>",
    }
    script = on[0]["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]
    assert "reference_image" not in script and "concept_token" not in script  # the list is all
    assert [set(s) for s in script["subjects"]] == [set(SUBJECT_KEYS)] * 2
    first, second = script["subjects"]
    assert (first["personalization"], first["concept_token"], first["class_phrase"]) == (
        "photo",
        "",
        "box",
    )
    assert (second["concept_token"], second["lora"], second["personalization"]) == (
        "zwx",
        "blue_vase_v2",
        "lora",
    )
    assert (
        script["show_intermediates"] is True and script["vanilla_checkpoint"] == "v1-5.safetensors"
    )
    img = out / "images" / "on" / "red_box+blue_vase" / "p00_s100.png"
    pic = Image.open(regions_mod.regions_path_for(str(img)))
    index = regions_mod.read_regions(pic)
    assert set(np.unique(index)) == {-1, 0, 1}
    assert index[10, 10] == 0 and index[10, 40] == 1  # subject 1 left, subject 2 right
    off_img = out / "images" / "off" / "red_box+blue_vase" / "p00_s100.png"
    assert off_img.is_file()
    assert not (out / "images" / "off" / "red_box+blue_vase" / "p00_s100.regions.png").exists()
    assert json.loads((out / "run.json").read_text())["protocol"] == runner.SUBJECTS_PROTOCOL
    # the one-subject protocol refuses this folder, naming the other protocol
    with pytest.raises(LayoutRetouchError, match="several-subjects"):
        runner.run_protocol(
            str(vico), str(concepts), standin.url, str(out), settings(), client=client(standin.url)
        )


def test_identity_in_each_region_and_collapse_have_their_exact_values(
    vico, concepts, tmp_path, standin
):
    """ON: subject 1 (red) always red; subject 2 (blue) blue at seed 100, painted red (blended) at
    seed 101, and absent from the snow prompt's seed-100 layout. OFF: green, no regions picture."""
    out = tmp_path / "out"
    _run(vico, concepts, out, standin)
    stub = ColourStub()
    report = subjects_scoring.score_subjects_run(
        str(out), Scorers(dino=stub, clip=stub), progress=False
    )
    on = {
        (r["prompt_index"], r["seed"], r["subject"]): r
        for r in report.per_region
        if r["method"] == "on"
    }
    assert len(on) == 8 and {r["source"] for r in on.values()} == {"picture"}
    blended = on[(0, BLEND_SEED, 2)]
    assert (blended["I_DINO"], blended["DINO_other"], blended["collapsed"]) == (0.0, 1.0, 1)
    kept = on[(0, 100, 2)]
    assert (kept["I_DINO"], kept["DINO_other"], kept["collapsed"]) == (1.0, 0.0, 0)
    assert on[(1, 100, 2)]["found"] == 0 and math.isnan(on[(1, 100, 2)]["I_DINO"])
    assert all(on[(p, s, 1)]["collapsed"] == 0 for p in (0, 1) for s in (100, 101))
    subj = {r["subject"]: r for r in report.per_subject if r["method"] == "on"}
    assert subj[1]["I_DINO_region"] == 1.0 and subj[1]["collapse_rate"] == 0.0
    # subject 2: table prompt (1 + 0)/2, snow prompt 0 (one region found): mean over prompts
    assert subj[2]["I_DINO_region"] == pytest.approx(0.25)
    assert (subj[2]["measured"], subj[2]["collapsed"]) == (3, 2)
    row = {r["method"]: r for r in report.rows}
    assert row["on"]["I_DINO_region"] == pytest.approx(0.625)
    assert row["on"]["DINO_other"] == pytest.approx(0.375)  # (0 + (0.5 + 1)/2) / 2
    assert row["on"]["collapse_rate"] == pytest.approx(2 / 7)
    assert row["on"]["missing_rate"] == pytest.approx(1 / 8)
    # T_CLIP (whole image, text → (0.6, 0.8)): a red-dominant image gives 0.6, a balanced one 1;
    # table prompt (1 + 0.6)/2, snow prompt 0.6 (subject 2 missing or red): mean 0.7
    assert row["on"]["T_CLIP"] == pytest.approx(0.7)
    assert row["off"]["T_CLIP"] == pytest.approx(1.0)  # green: (0.6, 0.8)
    assert row["off"]["regions"] == 0 and math.isnan(row["off"]["collapse_rate"])
    assert any("no regions" in n for n in report.notes)


def test_cli_run_then_score_writes_the_table_and_json(vico, concepts, tmp_path, standin, capsys):
    out = tmp_path / "results"
    common = ["--vico", str(vico), "--concepts", str(concepts), "--out", str(out)]
    size = ["--n", "2", "--steps", "4", "--width", "64", "--height", "48", "--seed", "100"]
    rc = cli_main(
        [
            "run",
            *common,
            "--url",
            standin.url,
            *size,
            "--subjects",
            "--backoff",
            "0",
            "--no-progress",
            "--no-score",
        ]
    )
    assert rc == 0
    rc = cli_main(
        ["score", "--out", str(out), "--random-models", "--no-progress", "--imagereward", "none"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "| method | I_DINO (region) | I_CLIP (region) | T_CLIP | collapse rate | missing rate |"
        in printed
    )
    data = json.loads((out / "results_subjects.json").read_text())
    assert data["random_weights"] is True and data["protocol"] == "subjects"
    summary = {r["method"]: r for r in data["summary"]}
    assert summary["on"]["regions"] == 8 and summary["on"]["found"] == 7
    assert summary["off"]["found"] == 0 and summary["off"]["I_DINO_region"] is None
    assert 0.0 <= summary["on"]["collapse_rate"] <= 1.0
    assert -1.0 <= summary["on"]["I_DINO_region"] <= 1.0
    regions = [r for r in data["per_region"] if r["method"] == "on"]
    assert len(regions) == 8 and all(r["source"] == "picture" for r in regions)
    assert all(r["found"] == 0 or -1.0 <= r["I_DINO"] <= 1.0 for r in regions)
    rows = list(csv.DictReader(open(out / "results_subjects_per_region.csv")))
    assert len(rows) == 16  # every image × subject, both methods
    assert "RANDOM WEIGHTS" in (out / "results_subjects.md").read_text()


def test_regions_picture_survives_a_lossy_copy_and_rejects_other_pictures():
    """A WebUI set to send JPEG (A1111's default quality 80) gives back the regions up to the
    edges JPEG smears (measured: 99.7 % of the pixels at 256², the bound 99 %)."""
    index = torch.full((256, 256), -1, dtype=torch.long)
    index[30:120, 20:120], index[60:200, 150:240] = 0, 1
    pic = regions_to_image(index, (256, 256))
    assert regions_mod.read_regions(pic).tolist() == index.tolist()  # lossless: exact
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=80)
    lossy = Image.open(io.BytesIO(buf.getvalue()))
    assert regions_mod.looks_like_regions(lossy)
    back = regions_mod.read_regions(lossy)
    assert (back == index.numpy()).mean() > 0.99
    for colour in SUBJECT_COLOURS[:2]:  # each subject's colour is read as its own
        assert colour in {
            tuple(c) for c in np.asarray(regions_mod.snap_to_palette(lossy)).reshape(-1, 3)
        }
    assert not regions_mod.looks_like_regions(Image.new("RGB", (60, 40), (90, 90, 90)))
    assert not regions_mod.looks_like_regions(Image.new("RGB", (60, 40), (0, 0, 0)))
    speck = np.zeros((100, 100), dtype=bool)
    speck[0, :10] = True  # 0.1 % of the image: the subject is missing
    assert regions_mod.subject_masks(np.where(speck, 0, -1), 1) == [None]


# ------------------------------------------------------------------ the library on the tiny model
class LibraryWebUI(runner.WebUIClient):
    """The txt2img API answered by the library itself on the tests' tiny SD1 model: the script's
    arguments parsed as the API parses them (`LayoutRetouchParams.from_dict`), a two-subject
    `RetouchJob` retouching a seeded layout latent, and the regions intermediate drawn as the
    extension draws it (`job.regions_to_image`). Keeps each ON image's regions for the test."""

    def __init__(self, ldm):
        super().__init__("http://library.invalid", retries=0)
        from lib_layout_retouch.unet.model import LdmModel

        self.model = LdmModel(ldm)
        self.regions: dict[tuple, torch.Tensor] = {}  # (prompt, seed) -> (h, w) subject index

    def txt2img_scripts(self):
        return ["layout-and-retouch"]

    def txt2img(self, payload: dict) -> dict:
        from lib_layout_retouch.job import RetouchJob, tensor_to_images
        from lib_layout_retouch.params import LayoutRetouchParams

        w, h, seed, prompt = payload["width"], payload["height"], payload["seed"], payload["prompt"]
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, 4, h // 8, w // 8, generator=g)
        script = payload["alwayson_scripts"]["Layout-and-Retouch"]["args"][0]
        infotext, images, infotexts = f"{prompt}\nSeed: {seed}", [], []
        if script["enabled"]:
            params = LayoutRetouchParams.from_dict(
                {k: v for k, v in script.items() if k != "show_intermediates"}
            )
            job = RetouchJob(params, prompt, "", payload["steps"], w, h, payload["cfg_scale"])
            res = job.retouch(
                self.model, latents, subject_tokens=job.subject_rows(self.model),
                model_key="tiny", cache=None, kv_cache=None,
            )  # fmt: skip
            latents = res.latents
            self.regions[(prompt, seed)] = res.regions[0]
            infotext += ", " + ", ".join(f"{k}: {v}" for k, v in job.infotext().items())
            images.append(regions_to_image(res.regions[0], (w, h)))
            infotexts.append(f'{INTERMEDIATE_KEY}: "subject regions"')
        image = tensor_to_images(self.model.decode(latents))[0]
        info = {"seed": seed, "infotexts": [infotext, *infotexts]}
        return {
            "images": [_png_b64(im) for im in (image, *images)],
            "info": json.dumps(info),
        }


def test_the_protocol_runs_on_the_tiny_model_and_measures_its_own_regions(vico, tmp_path, tiny_ldm):
    """Two photo-only subjects (a box and a vase) retouched by the library on the tiny SD1 model;
    `score` reads each subject's region back from the regions picture the run kept: every region's
    area is exactly its share of the retouch's own subject index, and the random-weight DINO/CLIP
    give each found region a similarity in [-1, 1] to its own and to the other subject's photos."""
    concepts = tmp_path / "photo_only.json"
    concepts.write_text(
        json.dumps(
            {
                "defaults": {"personalization": "photo", "lambda1": 1},
                "concepts": {"red_box": {"class": "box"}, "blue_vase": {"class": "vase"}},
            }
        )
    )
    webui = LibraryWebUI(tiny_ldm)
    out = tmp_path / "tiny"
    run = subjects_runner.run_subjects_protocol(
        str(vico), str(concepts), webui.url, str(out),
        runner.RunSettings(n=2, n_prompts=1, steps=6, width=64, height=64, seed=3,
                           lambda2=2, mask_start=4),
        client=webui, progress=False,
    )  # fmt: skip
    assert run.generated == 4 and len(webui.regions) == 2
    rc = cli_main(["score", "--out", str(out), "--random-models", "--no-progress"])
    assert rc == 0
    data = json.loads((out / "results_subjects.json").read_text())
    regions = [r for r in data["per_region"] if r["method"] == "on"]
    assert len(regions) == 4 and {r["source"] for r in regions} == {"picture"}
    for r in regions:
        index = webui.regions[("a box and a vase on a table", r["seed"])]
        share = float((index == r["subject"] - 1).float().mean())
        assert r["area"] == pytest.approx(share if share >= regions_mod.MIN_REGION_AREA else 0.0)
        if r["found"]:
            assert -1.0 <= r["I_DINO"] <= 1.0 and -1.0 <= r["DINO_other"] <= 1.0
            assert r["collapsed"] == int(r["DINO_other"] > r["I_DINO"])
    assert any(r["found"] for r in regions)
