"""`layout_retouch_comfy.nodes` without ComfyUI: the few ComfyUI modules its glue imports, stubbed the
way ComfyUI v0.3.64 has them (`comfy.samplers.KSampler`'s lists, `folder_paths`' model folders).
A test module makes its fixture of `stubbed_nodes`:

    @pytest.fixture
    def nodes(monkeypatch, tmp_path):
        yield from comfy_stubs.stubbed_nodes(monkeypatch, tmp_path)
"""

from __future__ import annotations

import importlib
import os
import sys
import types

SAMPLERS = ["euler", "ddim"]
SCHEDULERS = ["simple", "ddim_uniform"]


def folder_paths_stub(models_dir: str) -> types.ModuleType:
    """`folder_paths` as far as the glue reads it: folders by name, a non-recursive file list."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = models_dir
    # ComfyUI registers its own model folders (folder_paths.py); the glue lists loras
    fp.folder_names_and_paths = {"loras": ([os.path.join(models_dir, "loras")], {".safetensors"})}

    def add_model_folder_path(name, path, is_default=False):
        paths, _ = fp.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.append(path)

    def get_filename_list(name):
        paths, extensions = fp.folder_names_and_paths[name]
        return sorted(
            f
            for p in paths
            if os.path.isdir(p)
            for f in os.listdir(p)
            if not extensions or os.path.splitext(f)[1].lower() in extensions
        )

    def get_full_path(name, filename):
        for p in fp.folder_names_and_paths.get(name, ([], set()))[0]:
            if os.path.isfile(os.path.join(p, filename)):
                return os.path.join(p, filename)
        return None

    fp.add_model_folder_path = add_model_folder_path
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    return fp


def stubbed_nodes(monkeypatch, tmp_path):
    """layout_retouch_comfy.nodes with ComfyUI's modules stubbed; models_dir is tmp_path/models."""
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=SAMPLERS, SCHEDULERS=SCHEDULERS)
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: "cpu"
    stubs = {
        "comfy": types.ModuleType("comfy"),
        "comfy.samplers": samplers,
        "comfy.model_management": mm,
        "comfy.sample": types.ModuleType("comfy.sample"),
        "comfy.sd": types.ModuleType("comfy.sd"),
        "comfy.utils": types.ModuleType("comfy.utils"),
        "latent_preview": types.ModuleType("latent_preview"),
        "folder_paths": folder_paths_stub(str(tmp_path / "models")),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("comfy."):  # `import comfy.samplers` then reads comfy.samplers
            setattr(stubs["comfy"], name.split(".", 1)[1], module)
    names = ("layout_retouch_comfy.nodes", "layout_retouch_comfy.glue")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("layout_retouch_comfy.nodes")
    for name in names:
        sys.modules.pop(name, None)
