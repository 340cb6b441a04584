"""The interface every host adapter answers (see `hosts/__init__.py`)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch

from lib_layout_retouch.unet.model import LdmModel


class Host:
    """One WebUI as the glue sees it. Methods take the generation's `p` where the answer depends on
    the loaded model; nothing is kept on the adapter between generations."""

    name = "?"

    # -- the model ----------------------------------------------------------------------------------
    def check_model(self, p) -> None:
        """Refuse (LayoutRetouchError naming the model kind) what the retouch cannot run on."""
        raise NotImplementedError

    def check_params(self, p, params) -> None:
        """Refuse what this model kind cannot do with these parameters (after `check_model`)."""

    def unet(self, p) -> torch.nn.Module:
        """The UNet module (ldm's `diffusion_model` names) that sampling runs now."""
        raise NotImplementedError

    def set_unet(self, p, unet: torch.nn.Module) -> None:
        """Put `unet` in its place (by reference) for the next model calls."""
        raise NotImplementedError

    def library_model(self, p) -> LdmModel:
        """The model as `lib_layout_retouch` drives it: ε(x, t, cond), ᾱ, conditioning, VAE."""
        raise NotImplementedError

    def model_key(self, p, personalization: str) -> str:
        """What identifies the weights the reference is inverted with (for the inversion cache)."""
        raise NotImplementedError

    def decode_for_hires(self, p, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images as the host's hires pass expects its `decoded_samples`."""
        raise NotImplementedError

    def check_attention_free(self, p) -> None:
        """Refuse when something else replaces the attention modules the retouch edits."""

    def inference_context(self) -> ContextManager:
        """Where the retouch runs: the host's grad-free mode (its tensors must be usable there)."""
        return torch.no_grad()

    def stage1_latent(self, p, params) -> torch.Tensor:
        """This step's latents z_t of the batch, from the CFG-denoiser callback's params."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def place_vanilla_unet(self, p, unet: torch.nn.Module) -> None:
        """Before stage 1: put the vanilla UNet where it will run."""

    def release_vanilla_unet(self, p, unet: torch.nn.Module, keep_on_cpu: bool) -> None:
        """After stage 1: give back what the vanilla UNet holds, if the host or the user asks."""

    # -- text ---------------------------------------------------------------------------------------
    def encode_prompt(self, p, prompt: str):
        """The host's own conditioning of `prompt` at the generation's size (SDXL size terms)."""
        raise NotImplementedError

    def text_encoder_slots(self, p) -> list:
        """(holder, attribute, checkpoint key prefix) of each text transformer of the loaded model."""
        return []

    def text_encoder_note(self, p) -> str:
        """The note when `text_encoder_slots` is empty in DreamBooth: stage 1 read y_p⁻ with the loaded
        model's text encoders."""
        return "no vanilla text encoder for this model kind: stage 1 used the loaded model's"

    def text_encoders_to(self, p, modules: list, where: str) -> None:
        """Move copies of the text encoders where the host's encoding runs ('device' | 'cpu')."""

    def embedding_names(self) -> Optional[list[str]]:
        """Installed Textual-Inversion embeddings, or None when the host cannot say."""
        return None

    # -- LoRA ---------------------------------------------------------------------------------------
    def active_loras(self, p) -> list:
        """The LoRA networks active in this generation (opaque to the glue)."""
        return []

    def loras_off_in_text_encoder(self, p, loras: list) -> ContextManager:
        """A block in which the networks do not act on the text encoder."""
        return contextlib.nullcontext()

    def loras_off_in_unet(self, p, loras: list) -> Callable[[], None]:
        """Switch the networks off in the UNet; returns what switches them back on."""
        return lambda: None

    def lora_key(self, p) -> str:
        return ""

    def lora_tags(self, p) -> list[tuple[str, object]]:
        """The active LoRA networks as (the name of its prompt tag, the network), in prompt order."""
        return []

    def lora_scopes(self, p, own: list) -> tuple[list, Callable[[], ContextManager]]:
        """Several subjects with LoRAs (`own[k]`: subject k's network from `lora_tags`, or None):
        per subject a context factory in which its own network is the only one of `own` on in the
        UNet (None for a subject without one), and one in which none of `own` is on. Networks that
        are no subject's stay as they are; each context puts back what it found."""
        return [None] * len(own), contextlib.nullcontext

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self, name: str):
        """The checkpoint of the WebUI's list named `name` (an object with `.filename`, `.title`)."""
        raise NotImplementedError

    def checkpoint_titles(self) -> list[str]:
        raise NotImplementedError

    def refresh_checkpoints(self) -> None:
        """Re-read the checkpoint folder; never changes the model the WebUI generates with."""
        raise NotImplementedError

    @staticmethod
    def is_checkpoint_selector(kwargs) -> bool:
        """Whether a component built with `kwargs` is the page's checkpoint dropdown (the vanilla
        list follows it)."""
        return False

    def loaded_checkpoint(self, p=None):
        raise NotImplementedError

    def read_state_dict(self, filename: str) -> dict:
        raise NotImplementedError

    def fix_checkpoint_keys(self, state: dict) -> dict:
        """The host's renaming of old checkpoint keys (A1111: `get_state_dict_from_checkpoint`)."""
        return state

    def read_weights(self, filename: str, prefixes) -> dict:
        """The tensors of checkpoint `filename` whose keys start with one of `prefixes`. From a
        .safetensors file only those are read (a vanilla UNet from a 7 GB SDXL file reads its 5 GB,
        not all of it, and never holds the rest in memory); other formats go through the host."""
        prefixes = tuple(prefixes)
        if filename.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(filename, framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
            return self.fix_checkpoint_keys(state)
        state = self.read_state_dict(filename)
        return {k: v for k, v in state.items() if k.startswith(prefixes)}
