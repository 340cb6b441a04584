"""stable-diffusion-webui-forge (checked against commit dfdcbab6, 2025-06-26).

What differs from AUTOMATIC1111, and how this adapter answers it:
- The UNet is `sd_model.forge_objects.unet` (a `UnetPatcher`, re-read on every step); its `model` is a
  `KModel` whose `diffusion_model` keeps ldm's module names, so stage 1 swaps
  `forge_objects.unet.model.diffusion_model` and the retouch's per-instance attention wrappers address
  the same layers (`backend/nn/unet.py` calls `self.attn1(...)` unless a `patches_replace` entry
  replaces it — `check_attention_free` refuses that conflict by name).
- `KModel.apply_model(x, σ)` returns the denoised image on the k-diffusion σ scale (`backend/modules/
  k_model.py`): `lib_layout_retouch.adapters.forge.sd.ForgeModel` drives it as ε(z_t, t); ᾱ is the
  predictor's `alphas_cumprod`.
- `modules.sd_models.read_state_dict` is a stub: checkpoints are read with `backend.utils.load_torch_file`.
- LoRA is merged into the module weights by the patcher's `LoraLoader` (`backend/patcher/lora.py`), with
  a backup of the originals: "off" is `lora_loader.refresh(...)` with the other files' patches only
  (`{}`: the originals back), "on" is the patcher's own `refresh_loras()`; several subjects' LoRAs
  each in its own region re-merge a subset the same way (`lora_scopes`); A1111's `unet_multiplier`
  does not exist here.
- Text encoding and the VAE run in `torch.inference_mode()` and load their models through
  `backend.memory_management`; the retouch runs in inference mode too (`inference_context`).
- Flux.1 (dev/schnell; engine class `Flux`, `PredictionFlux`): the model is
  `lib_layout_retouch.adapters.forge.flux` (velocity = the transformer's output, Forge's σ table and
  "Simple" schedule, T5 + pooled CLIP-L through the engine, the generation's distilled CFG). Stage 1
  works as for SD (the KModel's `diffusion_model` is the transformer; LoRA off = the patcher's
  refresh).
- What differs between SD1.x/SDXL and Flux.1 — the support check, the parameter refusals, the library
  model, the stage-1 latent from the CFG denoiser's x, the text encoders DreamBooth swaps — is asked of
  the engine's family adapter (`lib_layout_retouch.adapters.forge.engine_family`); this module never
  asks which family is loaded.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from modules import shared

from layout_retouch_webui.hosts.a1111 import A1111Host
from lib_layout_retouch.adapters.forge import EngineFamily, engine_family
from lib_layout_retouch.adapters.forge.engines import attention_replacements
from lib_layout_retouch.errors import LayoutRetouchError


class ForgeHost(A1111Host):
    """Forge keeps A1111's Script API, `p.sample`, the CFG-denoiser callback and the checkpoint list;
    what it does differently is overridden here."""

    name = "Forge"

    # -- the model ----------------------------------------------------------------------------------
    @staticmethod
    def family_adapter(p) -> EngineFamily:
        """The loaded engine's family adapter: every family-dependent answer below is its."""
        return engine_family(p.sd_model)

    def check_model(self, p) -> None:
        self.family_adapter(p).check(p.sd_model)

    def check_params(self, p, params) -> None:
        from modules.processing import StableDiffusionProcessingImg2Img

        img2img = isinstance(p, StableDiffusionProcessingImg2Img)
        self.family_adapter(p).check_params(params, img2img=img2img)

    def check_attention_free(self, p) -> None:
        """Another extension's attention replacement (`set_model_attn1_replace`, ...) bypasses the
        modules the retouch edits: refuse, naming it, instead of retouching nothing."""
        kinds = attention_replacements(p.sd_model.forge_objects.unet.model_options)
        if kinds:
            raise LayoutRetouchError(
                f"another extension replaces the UNet's attention ({', '.join(kinds)} via Forge's "
                "set_model_attn*_replace), which the retouch must edit; turn that extension off for "
                "retouched images",
                parameter="enabled",
            )

    def unet(self, p):
        return p.sd_model.forge_objects.unet.model.diffusion_model

    def set_unet(self, p, unet) -> None:
        p.sd_model.forge_objects.unet.model.diffusion_model = unet

    def library_model(self, p):
        from backend import memory_management

        memory_management.load_model_gpu(
            p.sd_model.forge_objects.unet
        )  # on the device, LoRA merged
        return self.family_adapter(p).model(
            p.sd_model,
            load_model=memory_management.load_model_gpu,
            sdxl_crop=self.sdxl_crop(),
            distilled_cfg_scale=getattr(p, "distilled_cfg_scale", None),
        )

    def inference_context(self):
        return torch.inference_mode()

    def decode_for_hires(self, p, latents):
        return p.sd_model.decode_first_stage(latents).float().cpu()

    @property
    def device(self):
        from backend import memory_management

        return memory_management.get_torch_device()

    def place_vanilla_unet(self, p, unet) -> None:
        patcher = p.sd_model.forge_objects.unet
        device = getattr(patcher, "load_device", None) or self.device
        if next(unet.parameters()).device != torch.device(device):
            unet.to(device)

    def release_vanilla_unet(self, p, unet, keep_on_cpu: bool) -> None:
        if keep_on_cpu:
            unet.to("cpu")

    def stage1_latent(self, p, params) -> torch.Tensor:
        """Forge's CFG denoiser gets x once per image (it batches cond/uncond itself); how x relates
        to z_t is the family's (ε: on the σ scale; Flux: x itself)."""
        b = p.batch_size
        return self.family_adapter(p).stage1_latent(params.x[-b:], params.sigma[-b:])

    # -- text ---------------------------------------------------------------------------------------
    def encode_prompt(self, p, prompt: str):
        from modules.prompt_parser import SdConditioning

        # Flux reads the distilled guidance from the prompt list (flux.py:90; 3.5 when absent)
        return p.sd_model.get_learned_conditioning(
            SdConditioning(
                [prompt],
                width=p.width,
                height=p.height,
                distilled_cfg_scale=getattr(p, "distilled_cfg_scale", None),
            )
        )

    def text_encoder_slots(self, p) -> list:
        return self.family_adapter(p).text_encoder_slots(p.sd_model)

    def text_encoder_note(self, p) -> str:
        return self.family_adapter(p).text_encoder_note or super().text_encoder_note(p)

    def text_encoders_to(self, p, modules, where: str) -> None:
        from backend import memory_management

        device = (
            memory_management.text_encoder_device() if where == "device" else torch.device("cpu")
        )
        for m in modules:
            m.to(device)

    def embedding_names(self):
        engine = getattr(shared, "sd_model", None)
        tpe = getattr(engine, "text_processing_engine_l", None) or getattr(
            engine, "text_processing_engine", None
        )
        db = getattr(tpe, "embeddings", None)
        return list(getattr(db, "word_embeddings", {}) or {}) if db is not None else None

    # -- LoRA ---------------------------------------------------------------------------------------
    def active_loras(self, p) -> list:
        """The LoRA files merged into this generation's UNet patcher (`sd_forge_lora`)."""
        patcher = p.sd_model.forge_objects.unet
        return [key[0] for key in (getattr(patcher, "lora_patches", None) or {})]

    @contextlib.contextmanager
    def loras_off_in_text_encoder(self, p, loras):
        if not loras:
            yield
            return
        from backend import memory_management

        patcher = p.sd_model.forge_objects.clip.patcher
        memory_management.load_model_gpu(
            patcher
        )  # loaded (LoRA merged) now, so encoding loads nothing more
        _refresh(patcher, _without(patcher.lora_patches, loras))
        try:
            yield
        finally:
            patcher.refresh_loras()

    def loras_off_in_unet(self, p, loras):
        if not loras:
            return lambda: None
        patcher = p.sd_model.forge_objects.unet
        _refresh(patcher, _without(patcher.lora_patches, loras))
        return patcher.refresh_loras

    def lora_key(self, p) -> str:
        patcher = p.sd_model.forge_objects.unet
        return str(list((getattr(patcher, "lora_patches", None) or {}).keys()))

    def lora_tags(self, p):
        """(tag name, file) of the `networks` module's loaded networks whose file is merged into
        this generation's UNet patcher (its `lora_patches` keys start with the file name)."""
        merged = set(self.active_loras(p))
        networks = sys.modules.get("networks")  # sd_forge_lora
        tags = []
        for net in getattr(networks, "loaded_networks", None) or []:
            filename = getattr(getattr(net, "network_on_disk", None), "filename", None)
            if filename in merged:
                tags.append((net.name, filename))
        return tags

    def lora_scopes(self, p, own):
        """By re-merging a subset of the patcher's `lora_patches` (the loader restores its backup
        first): subject k's file and the files of no subject; on leaving, what was merged before."""
        patcher = p.sd_model.forge_objects.unet
        patches = dict(patcher.lora_patches)
        files = [f for f in own if f is not None]
        merged = []  # the subsets the open scopes merged, innermost last

        def only(on):
            @contextlib.contextmanager
            def scope():
                merged.append(_without(patches, [f for f in files if f != on]))
                _refresh(patcher, merged[-1])
                try:
                    yield
                finally:
                    merged.pop()
                    _refresh(patcher, merged[-1] if merged else patches)

            return scope

        return [None if f is None else only(f) for f in own], only(None)

    # -- checkpoints --------------------------------------------------------------------------------
    def read_state_dict(self, filename):
        from backend.utils import load_torch_file

        return load_torch_file(filename, safe_load=True)

    def fix_checkpoint_keys(self, state):
        return state  # Forge's `get_state_dict_from_checkpoint` is a stub; its loader keeps the file's keys


def _without(lora_patches: dict, files) -> dict:
    """The patcher's `lora_patches` without the LoRA files `files` (keys: (file, strengths…))."""
    files = set(files)
    return {k: v for k, v in (lora_patches or {}).items() if k[0] not in files}


def _refresh(patcher, lora_patches: dict) -> None:
    """Merge exactly `lora_patches` into the patcher's model (the originals restored first)."""
    patcher.lora_loader.refresh(lora_patches=lora_patches, offload_device=patcher.offload_device)
