"""ComfyUI's HTTP API as the tier uses it: /prompt, /history, /view, /upload/image, /interrupt."""

from __future__ import annotations

import io
import time
import uuid

import host_server as S
import numpy as np
import requests
from PIL import Image

CLIENT = uuid.uuid4().hex


def get(url: str, path: str, **params):
    r = requests.get(url + path, params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_ready(s: S.Server, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if s.proc is not None and s.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {s.proc.returncode}:\n{S.tail(s.log_path)}")
        try:
            if requests.get(s.url + "/system_stats", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(
        f"ComfyUI did not answer /system_stats within {timeout:.0f}s:\n{S.tail(s.log_path)}"
    )


def start(args, cwd, env, url, log_path, timeout) -> S.Server:
    import subprocess

    t0 = time.monotonic()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=S._die_with_parent,
    )
    log.close()
    s = S.Server(
        url, pid=proc.pid, log_path=log_path, proc=proc, what="ComfyUI", env_prefix="LR_COMFY"
    )
    try:
        wait_ready(s, timeout)
    except BaseException:
        S.stop(s)
        raise
    s.started_s = time.monotonic() - t0
    return s


def queue(url: str, graph: dict) -> str:
    r = requests.post(url + "/prompt", json={"prompt": graph, "client_id": CLIENT}, timeout=30)
    if r.status_code != 200:
        raise AssertionError(f"/prompt refused the graph ({r.status_code}): {r.text[:2000]}")
    return r.json()["prompt_id"]


def refused(url: str, graph: dict) -> dict:
    """POST a graph ComfyUI must refuse before running it: its 400 answer (`error`, `node_errors`)."""
    r = requests.post(url + "/prompt", json={"prompt": graph, "client_id": CLIENT}, timeout=30)
    if r.status_code != 400:
        raise AssertionError(f"/prompt accepted the graph ({r.status_code}): {r.text[:2000]}")
    return r.json()


class Result:
    def __init__(self, url: str, prompt_id: str, entry: dict):
        self.url, self.prompt_id, self.entry = url, prompt_id, entry
        self.status = entry.get("status", {})
        self.outputs = entry.get("outputs", {})

    @property
    def ok(self) -> bool:
        return self.status.get("status_str") == "success"

    def messages(self, kind: str) -> list[dict]:
        return [data for name, data in self.status.get("messages", []) if name == kind]

    def error(self) -> dict:
        errors = self.messages("execution_error")
        return errors[0] if errors else {}

    def describe(self) -> str:
        e = self.error()
        return (
            f"{self.status.get('status_str')}: {e.get('node_type')}: {e.get('exception_message')}"
        )

    def files(self, node: str, key: str) -> list[bytes]:
        out = []
        for f in self.outputs.get(node, {}).get(key, []):
            r = requests.get(
                self.url + "/view",
                params=dict(
                    filename=f["filename"],
                    subfolder=f.get("subfolder", ""),
                    type=f.get("type", "output"),
                ),
                timeout=30,
            )
            r.raise_for_status()
            out.append(r.content)
        return out

    def latent(self, node: str):
        """The LATENT a SaveLatent node wrote (safetensors `latent_tensor`)."""
        from safetensors.torch import load

        (data,) = self.files(node, "latents")
        return load(data)["latent_tensor"]

    def images(self, node: str) -> list[np.ndarray]:
        return [
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in self.files(node, "images")
        ]


def wait(url: str, prompt_id: str, timeout: float = 900) -> Result:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = get(url, f"/history/{prompt_id}")
        if prompt_id in h:  # written once the prompt has finished (success, error or interrupt)
            return Result(url, prompt_id, h[prompt_id])
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")


def run(url: str, graph: dict, timeout: float = 900) -> Result:
    return wait(url, queue(url, graph), timeout)


def upload(url: str, image: Image.Image, name: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    r = requests.post(
        url + "/upload/image",
        files={"image": (name, buf.getvalue(), "image/png")},
        data={"overwrite": "true"},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["name"]


def interrupt(url: str) -> None:
    requests.post(url + "/interrupt", timeout=30).raise_for_status()


def queue_running(url: str) -> bool:
    return bool(get(url, "/queue").get("queue_running"))


def queue_and_interrupt_when(url: str, graph: dict, node: str, when, timeout: float = 900) -> str:
    """Queue `graph` and POST /interrupt as soon as the progress of `node` satisfies
    `when(value, max)` (ComfyUI's websocket "progress" messages to this client); the prompt id."""
    import asyncio
    import json

    import aiohttp

    async def go() -> str:
        async with aiohttp.ClientSession() as s:
            ws_url = url.replace("http", "ws", 1) + f"/ws?clientId={CLIENT}"
            async with s.ws_connect(ws_url) as ws:
                pid = queue(url, graph)
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    m = json.loads(msg.data)
                    d = m.get("data") or {}
                    if (
                        m.get("type") == "progress"
                        and d.get("prompt_id") == pid
                        and d.get("node") == node
                    ):
                        if when(d["value"], d["max"]):
                            interrupt(url)
                            return pid
                    if (
                        m.get("type") in ("execution_success", "execution_error")
                        and d.get("prompt_id") == pid
                    ):
                        raise AssertionError(f"{pid} ended before the condition: {m}")
        raise AssertionError("the websocket closed")

    return asyncio.run(asyncio.wait_for(go(), timeout))
