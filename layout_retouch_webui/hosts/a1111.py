"""AUTOMATIC1111 stable-diffusion-webui (v1.10): ldm/sgm models with `apply_model` returning ε.

- The UNet is `sd_model.model.diffusion_model`; stage 1 swaps it by reference.
- LoRA (the built-in `networks` extension) is switched by the networks' `te_multiplier` /
  `unet_multiplier`, which its patched forward reads on every call.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from modules import devices, sd_models, shared

from layout_retouch_webui import options
from layout_retouch_webui.hosts.base import Host
from layout_retouch_webui.options import opt
from lib_layout_retouch.unet.model import LdmModel, check_model_supported
from lib_layout_retouch.unet.text_encoders import TEXT_ENCODER_PREFIXES

SD_MODEL_OPTION = (
    "sd_model_checkpoint"  # the WebUI's option naming the checkpoint it generates with
)


class A1111Host(Host):
    name = "AUTOMATIC1111"

    # -- the model ----------------------------------------------------------------------------------
    def check_model(self, p) -> None:
        check_model_supported(p.sd_model)

    def unet(self, p):
        return p.sd_model.model.diffusion_model

    def set_unet(self, p, unet) -> None:
        p.sd_model.model.diffusion_model = unet

    def library_model(self, p) -> LdmModel:
        return LdmModel(p.sd_model, autocast=devices.autocast, sdxl_crop=self.sdxl_crop())

    @staticmethod
    def sdxl_crop() -> tuple[int, int]:
        """The WebUI's SDXL crop settings (top, left), for the generated image's size terms."""
        return int(opt(options.SDXL_CROP_TOP)), int(opt(options.SDXL_CROP_LEFT))

    def model_key(self, p, personalization: str) -> str:
        checkpoint = getattr(p.sd_model, "sd_checkpoint_info", None)
        return "|".join([getattr(checkpoint, "filename", "?"), personalization, self.lora_key(p)])

    def decode_for_hires(self, p, latents):
        with devices.autocast():
            return p.sd_model.decode_first_stage(latents.to(devices.dtype_vae)).float().cpu()

    def stage1_latent(self, p, params):
        # x_in holds the cond rows then the uncond rows; its last B rows are the latents themselves.
        return params.x[-p.batch_size :]

    @property
    def device(self):
        return devices.device

    @staticmethod
    def _lowvram(p) -> bool:
        return bool(getattr(p.sd_model, "lowvram", False))

    def place_vanilla_unet(self, p, unet) -> None:
        if self._lowvram(p):
            # In --medvram/--lowvram the WebUI's own hooks (on the UNet wrapper, or copied with the
            # blocks) move it to the GPU when it runs.
            return
        device = next(self.unet(p).parameters()).device
        if next(unet.parameters()).device != device:
            unet.to(device)

    def release_vanilla_unet(self, p, unet, keep_on_cpu: bool) -> None:
        lowvram_flag = bool(getattr(shared.cmd_opts, "lowvram", False))
        medvram = self._lowvram(p) and not lowvram_flag
        if (keep_on_cpu or medvram) and not lowvram_flag:
            # --medvram moves the whole UNet wrapper to the GPU with whatever UNet it holds, and back
            # without the swapped-out one: send the vanilla UNet back ourselves. (--lowvram's per-block
            # hooks handle it; never move a lowvram model as a whole.)
            unet.to("cpu")

    # -- text ---------------------------------------------------------------------------------------
    def encode_prompt(self, p, prompt: str):
        from modules.prompt_parser import SdConditioning

        with devices.autocast():
            # SdConditioning: SDXL's size terms are the generation's, as the WebUI's own
            return p.sd_model.get_learned_conditioning(
                SdConditioning([prompt], width=p.width, height=p.height)
            )

    def text_encoder_slots(self, p) -> list:
        """The WebUI's encoder objects wrap the original (`.wrapped`)."""
        sd_model = p.sd_model

        def inner(e):
            return getattr(e, "wrapped", e)

        if getattr(sd_model, "is_sdxl", False):
            embedders = list(sd_model.conditioner.embedders)
            slots = [
                (inner(embedders[0]), "transformer", TEXT_ENCODER_PREFIXES["sdxl_clip_l"]),
                (inner(embedders[1]), "model", TEXT_ENCODER_PREFIXES["sdxl_clip_g"]),
            ]
        else:
            encoder = inner(sd_model.cond_stage_model)
            sd1 = hasattr(encoder, "transformer")  # SD1 CLIP / SD2 OpenCLIP
            attr, kind = ("transformer", "sd1") if sd1 else ("model", "sd2")
            slots = [(encoder, attr, TEXT_ENCODER_PREFIXES[kind])]
        return [s for s in slots if isinstance(getattr(s[0], s[1], None), torch.nn.Module)]

    def text_encoders_to(self, p, modules, where: str) -> None:
        if self._lowvram(p):  # the WebUI's hooks move only its own modules
            for m in modules:
                m.to(devices.device if where == "device" else devices.cpu)

    def embedding_names(self):
        try:
            from modules import sd_hijack

            return list(sd_hijack.model_hijack.embedding_db.word_embeddings)
        except Exception:  # no embedding DB: nothing to compare with
            return None

    # -- LoRA ---------------------------------------------------------------------------------------
    def active_loras(self, p) -> list:
        networks = sys.modules.get("networks")  # the built-in Lora extension
        return list(getattr(networks, "loaded_networks", []) or [])

    @contextlib.contextmanager
    def loras_off_in_text_encoder(self, p, loras):
        saved = [(n, n.te_multiplier) for n in loras]
        try:
            for n in loras:
                n.te_multiplier = 0
            yield
        finally:
            for n, m in saved:
                n.te_multiplier = m

    def loras_off_in_unet(self, p, loras):
        saved = [(n, n.unet_multiplier) for n in loras]
        for n in loras:
            n.unet_multiplier = 0

        def restore():
            for n, m in saved:
                n.unet_multiplier = m

        return restore

    def lora_key(self, p) -> str:
        return ",".join(f"{n.name}:{n.unet_multiplier}" for n in self.active_loras(p))

    def lora_tags(self, p):
        return [(n.name, n) for n in self.active_loras(p)]  # `name`: the tag's, as written

    def lora_scopes(self, p, own):
        """By the networks' `unet_multiplier` (read at each call): subject k's network at the
        multiplier it has now, the other subjects' at 0."""
        nets = [n for n in own if n is not None]
        strength = {id(n): n.unet_multiplier for n in nets}

        def only(on):
            @contextlib.contextmanager
            def scope():
                saved = [(n, n.unet_multiplier) for n in nets]
                for n in nets:
                    n.unet_multiplier = strength[id(n)] if n is on else 0
                try:
                    yield
                finally:
                    for n, m in saved:
                        n.unet_multiplier = m

            return scope

        return [None if n is None else only(n) for n in own], only(None)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self, name):
        return sd_models.get_closet_checkpoint_match(name) if name else None

    def checkpoint_titles(self):
        return list(sd_models.checkpoint_tiles())

    def refresh_checkpoints(self):
        """Re-read the checkpoint folder without changing the model the WebUI generates with:
        `sd_models.list_models()` also sets the checkpoint option back to the `--ckpt` file when the
        WebUI was started with one (`modules/sd_models.py` 167-171, the same in Forge), and the next
        generation would silently load that file. The option is put back as it was (without its
        `onchange`: nothing is loaded)."""
        chosen = shared.opts.data.get(SD_MODEL_OPTION)
        sd_models.list_models()
        if chosen is not None:
            shared.opts.data[SD_MODEL_OPTION] = chosen

    @staticmethod
    def is_checkpoint_selector(kwargs) -> bool:
        """Whether a component built with `kwargs` is the page's checkpoint dropdown: A1111's
        quicksetting, or Forge's model selection (its `model_selection` class; Forge keeps this
        method from A1111's adapter)."""
        return kwargs.get("elem_id") == f"setting_{SD_MODEL_OPTION}" or "model_selection" in (
            kwargs.get("elem_classes") or []
        )

    def loaded_checkpoint(self, p=None):
        model = p.sd_model if p is not None else getattr(shared, "sd_model", None)
        return getattr(model, "sd_checkpoint_info", None)

    def read_state_dict(self, filename):
        return sd_models.read_state_dict(filename, map_location="cpu")

    def fix_checkpoint_keys(self, state):
        return sd_models.get_state_dict_from_checkpoint(state)
