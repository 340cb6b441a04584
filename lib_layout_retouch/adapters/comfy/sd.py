"""ComfyUI's MODEL / CLIP / VAE as the retouch drives them (the model half of the ComfyUI adapter).

ComfyUI hands nodes a `ModelPatcher` (`comfy/model_patcher.py`) whose `model` is a `BaseModel`
(`comfy/model_base.py`): `apply_model(x, σ, c_crossattn=…, y=…, transformer_options=…)` returns the
denoised image on the k-diffusion σ scale, `diffusion_model` is ldm's UNet with ldm's module names,
`model_sampling.sigmas` holds σ of the 1000 training timesteps, `process_latent_in/out` scale between
the LATENT socket's raw VAE latents and the model's. Forge's backend descends from this code, so the
conversion is `KDiffusionModel`'s, as for Forge. Text goes through the CLIP object
(`tokenize` / `encode_from_tokens`), images through the VAE object (`encode` / `decode` on
(B, H, W, 3) in [0, 1]). Nothing here imports ComfyUI: the objects are handed in, and what must be
called inside ComfyUI (loading a patcher onto its device: `comfy.model_management.load_models_gpu`)
is a callable the glue passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from typing import Callable, Optional

import torch

from ...conditioning import SizeTerms, pad_tokens
from ...dit.flux.family import FLUX_FAMILY
from ...errors import LayoutRetouchError
from ...unet.family import SD1, SD1_FAMILY, SDXL, SDXL_FAMILY
from ...unet.model import KDiffusionModel, alpha_cumprod_of_sigma
from ..forge.engines import attention_replacements

# ComfyUI model configs (`comfy/supported_models.py`, the class name of `BaseModel.model_config`)
SUPPORTED_CONFIGS = {
    "SD15": SD1_FAMILY,
    "SDXL": SDXL_FAMILY,
    "Flux": FLUX_FAMILY,  # Flux.1-dev (and its fine-tunes): ModelType.FLUX, guidance embedding
    "FluxSchnell": FLUX_FAMILY,  # ModelType.FLOW, no guidance embedding
}
CONNECT = "connect an SD1.x, SDXL or Flux.1 model"
_OTHER_DIT = "another transformer, whose blocks the retouch does not edit"
UNSUPPORTED_CONFIGS = {
    "FluxInpaint": "Flux.1 Fill (an inpainting transformer that takes the image as channels)",
    "Chroma": f"Chroma (a Flux-family transformer without the pooled CLIP vector; {_OTHER_DIT})",
    "ChromaRadiance": f"Chroma Radiance ({_OTHER_DIT})",
    "SD3": f"SD3 (the MMDiT; {_OTHER_DIT})",
    "HunyuanDiT": f"HunyuanDiT ({_OTHER_DIT})",
    "HunyuanDiT1": f"HunyuanDiT ({_OTHER_DIT})",
    "AuraFlow": f"AuraFlow ({_OTHER_DIT})",
    "PixArtAlpha": f"PixArt ({_OTHER_DIT})",
    "PixArtSigma": f"PixArt ({_OTHER_DIT})",
    "Lumina2": f"Lumina 2 ({_OTHER_DIT})",
    "HiDream": f"HiDream ({_OTHER_DIT})",
    "QwenImage": f"Qwen-Image ({_OTHER_DIT})",
    "SDXLRefiner": "the SDXL refiner (not a personalized model; it cannot draw a layout)",
    "SD15_instructpix2pix": "InstructPix2Pix (an image-conditioned UNet)",
    "SDXL_instructpix2pix": "InstructPix2Pix (an image-conditioned UNet)",
}
_UNET_KEYS = (
    "model_channels",
    "context_dim",
    "transformer_depth",
    "channel_mult",
    "adm_in_channels",
)
# What must agree between the personalized model and its vanilla model (`unet_config` keys)
SAME_ARCHITECTURE = {
    SD1_FAMILY: _UNET_KEYS,
    SDXL_FAMILY: _UNET_KEYS,
    FLUX_FAMILY: (
        "hidden_size",
        "depth",
        "depth_single_blocks",
        "context_in_dim",
        "guidance_embed",
    ),
}
START_TOKEN, END_TOKEN = 49406, 49407  # CLIP's BOS/EOS (ComfyUI's SD1/SDXL tokenizers)
_PAD = -(2**40)  # a chunk's padding slot: matches no token


def config_name(base_model) -> str:
    return type(getattr(base_model, "model_config", None)).__name__


def model_family_of(base_model) -> str:
    """'SD1.x', 'SDXL' or 'Flux' for a supported `BaseModel`; anything else is refused by
    `check_supported`."""
    return SUPPORTED_CONFIGS.get(config_name(base_model), "")


def is_flux(patcher) -> bool:
    return model_family_of(getattr(patcher, "model", None)) == FLUX_FAMILY


def _unet_config(base) -> dict:
    return getattr(getattr(base, "model_config", None), "unet_config", {}) or {}


def check_supported(patcher, input_name: str = "model") -> None:
    """Refuse, naming the model kind and the input, what the retouch cannot run on."""
    base = getattr(patcher, "model", None)
    name = config_name(base)
    if name in UNSUPPORTED_CONFIGS:
        raise LayoutRetouchError(
            f"{UNSUPPORTED_CONFIGS[name]} is not supported; {CONNECT} to '{input_name}'",
            parameter=input_name,
        )
    if name not in SUPPORTED_CONFIGS or getattr(base, "diffusion_model", None) is None:
        raise LayoutRetouchError(
            f"the model on '{input_name}' ({name or type(base).__name__}) is neither SD1.x, SDXL "
            f"nor Flux.1; {CONNECT}",
            parameter=input_name,
        )
    kind = prediction_kind(patcher)
    if model_family_of(base) == FLUX_FAMILY:
        if kind != "CONST":  # a node replaced the flow's sampling object
            raise LayoutRetouchError(
                f"a Flux.1 model sampled as {kind} is not supported on '{input_name}': the flow "
                "inversion assumes the rectified flow (CONST); take the ModelSampling node out",
                parameter=input_name,
            )
        return
    in_channels = _unet_config(base).get("in_channels")
    if in_channels not in (None, 4):
        raise LayoutRetouchError(
            f"inpainting models ({in_channels} input channels) are not supported on "
            f"'{input_name}'; connect a txt2img SD1.x or SDXL model (inpaint with the MASK input)",
            parameter=input_name,
        )
    if kind != "EPS":
        raise LayoutRetouchError(
            f"{kind} models (e.g. v-prediction) are not supported on '{input_name}': the DDIM "
            "inversion assumes ε-prediction; connect an ε-prediction model",
            parameter=input_name,
        )


def model_sampling(patcher):
    """The model's sampling object as its sampler will see it: a node such as ModelSamplingDiscrete
    (or ModelSamplingFlux) replaces it by an object patch (applied when the model is loaded)."""
    get = getattr(patcher, "get_model_object", None)
    if get is not None:
        try:
            return get("model_sampling")
        except (AttributeError, KeyError):
            pass
    return patcher.model.model_sampling


def prediction_kind(patcher) -> str:
    """'EPS', 'V_PREDICTION', 'CONST' (flow), … from the sampling object's classes (ComfyUI builds it
    from the model type's class and a schedule class) or, failing that, the BaseModel's
    `model_type`."""
    names = [c.__name__ for c in type(model_sampling(patcher)).__mro__]
    for kind in ("V_PREDICTION", "EDM", "CONST", "X0", "IMG_TO_IMG", "EPS"):
        if kind in names:
            return kind
    return getattr(getattr(patcher.model, "model_type", None), "name", "EPS")


def check_same_architecture(personalized, vanilla, input_name: str = "vanilla_model") -> None:
    """The vanilla model draws the layout the personalized one continues: same family and network
    (a Flux.1 vanilla for an SD model, or the reverse, is refused naming both)."""
    check_supported(vanilla, input_name)
    a, b = personalized.model, vanilla.model
    fa, fb = model_family_of(a), model_family_of(b)
    keys = SAME_ARCHITECTURE.get(fa, ())
    ca = {k: _unet_config(a).get(k) for k in keys}
    cb = {k: _unet_config(b).get(k) for k in keys}
    if fa != fb or ca != cb:
        what = "another network" if fa == fb else "another model family"
        raise LayoutRetouchError(
            f"'{input_name}' is {fb or config_name(b)} but 'model' is {fa or config_name(a)} "
            f"({what}): connect the checkpoint your personalized model was fine-tuned from (for a "
            "LoRA: the MODEL before the LoRA loader)",
            parameter=input_name,
        )


def check_attention_free(patcher, input_name: str = "model") -> None:
    """Another node's attention replacement (`set_model_attn1_replace`, …) bypasses the modules the
    retouch edits: refuse, naming the patch, instead of retouching nothing."""
    options = getattr(patcher, "model_options", {}) or {}
    kinds = attention_replacements(options)
    if not kinds:
        return
    replaced = options["transformer_options"]["patches_replace"]
    names = sorted(
        {
            f"{kind} by {_callable_name(fn)}"
            for kind in kinds
            for fn in (replaced.get(kind) or {}).values()
        }
    )
    raise LayoutRetouchError(
        f"another node replaces the UNet's attention on '{input_name}' ({'; '.join(names)}, via "
        "set_model_attn*_replace), which the retouch must edit; take that node out of the MODEL "
        "path that feeds this one",
        parameter=input_name,
    )


def _callable_name(fn) -> str:
    target = getattr(fn, "func", fn)  # functools.partial
    cls = target if isinstance(target, type) else type(target)
    name = getattr(target, "__qualname__", None) or cls.__qualname__
    module = getattr(target, "__module__", None) or cls.__module__
    return f"{module}.{name}"


# Stable keys per model object for the inversion cache (ids are reused after a model is freed).
_MODEL_KEYS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def token_ids(chunks, *, end_token: int, has_start: bool = True) -> list[int]:
    """Token ids of a ComfyUI tokenizer's chunks (`clip.tokenize(text)[key]`: lists of (token,
    weight[, word]) entries) laid out as the conditioning's rows. CLIP (`has_start`): each chunk is
    BOS, 75 slots, EOS, filled word by word (a word that does not fit starts the next chunk), so each
    chunk's 75 slots are given in full, BOS and last EOS dropped; T5 (no start token): the tokens,
    EOS, padding — rows from 0. Everything from a chunk's EOS on is padding (`_PAD`, matches no
    token), trailing padding dropped. An embedding (`embedding:name`) stands in the chunk as vectors:
    one id per vector, from its values."""
    ids: list[int] = []
    for chunk in chunks:
        ended = False
        for entry in chunk[1:-1] if has_start else chunk:
            token = entry[0]
            if isinstance(token, torch.Tensor):
                digest = hashlib.sha1(token.detach().float().cpu().numpy().tobytes()).digest()
                ids.append(-int.from_bytes(digest[:6], "big") - 1)
                continue
            token = int(token)
            ended = ended or token == end_token
            ids.append(_PAD if ended else token)
    while ids and ids[-1] == _PAD:
        ids.pop()
    return ids


def transformer_options(patcher, sigma) -> dict:
    """The MODEL's transformer options for one call, as ComfyUI's sampler hands them: a fresh dict per
    call (the network writes into it) with the call's σ."""
    options = dict((getattr(patcher, "model_options", {}) or {}).get("transformer_options") or {})
    options["sigmas"] = sigma
    return options


class ComfyObjects:
    """What both ComfyUI model adapters (ComfyModel here, comfy_flux_model.ComfyFluxModel) read from
    the MODEL and VAE objects: the device, the weights' key, the VAE and the LATENT socket's scale.
    Needs `patcher` (the ModelPatcher) and `vae` (ComfyUI's VAE object)."""

    patcher: object
    vae: object

    @property
    def device(self) -> torch.device:
        device = getattr(self.patcher, "load_device", None)
        return torch.device(device) if device is not None else super().device

    def model_key(self) -> str:
        """Which weights answer: the model object and its weight patches (a LoRA changes them)."""
        base = self.patcher.model
        if base not in _MODEL_KEYS:
            _MODEL_KEYS[base] = f"{config_name(base)}#{len(_MODEL_KEYS)}:{id(base):x}"
        return f"{_MODEL_KEYS[base]}:{getattr(self.patcher, 'patches_uuid', '')}"

    # -- VAE --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → the model's latents. ComfyUI's VAE takes the posterior's
        mode (its regularizer does not sample), so the inversion is deterministic."""
        pixels = ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()
        raw = self.vae.encode(pixels[..., :3])
        return self.patcher.model.process_latent_in(raw.float()).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = self.patcher.model.process_latent_out(latents.float())
        pixels = self.vae.decode(raw.cpu())
        if pixels.ndim == 5:  # video VAEs add a frame axis
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
        return (pixels.float().movedim(-1, 1) * 2 - 1).to(latents.device)

    @contextlib.contextmanager
    def patcher_as(self, patcher):
        """The calls inside run on `patcher`: a clone of this MODEL with other weight patches (a
        subject's LoRA); ComfyUI re-patches the shared weights when `load_model` loads it."""
        own, self.patcher = self.patcher, patcher
        try:
            yield
        finally:
            self.patcher = own

    def raw_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents → the LATENT socket's (raw VAE) latents."""
        return self.patcher.model.process_latent_out(latents.float())

    def model_latents(self, raw: torch.Tensor) -> torch.Tensor:
        return self.patcher.model.process_latent_in(raw.float())


class ComfyModel(ComfyObjects, KDiffusionModel):
    """ε through the BaseModel's denoiser, text through the CLIP object, a deterministic VAE.

    `patcher`: the ModelPatcher to run (the glue's clone of the user's MODEL); `clip`, `vae`: the
    CLIP and VAE objects; `load_model(patcher)` puts a patcher's model on its device with its weight
    patches (LoRA) applied — `comfy.model_management.load_models_gpu([patcher])`; a no-op by default.
    """

    def __init__(self, patcher, clip, vae, *, load_model: Callable = lambda patcher: None):
        super().__init__(patcher.model)
        self.patcher = patcher
        self.clip = clip
        self.vae = vae
        self.load_model = load_model
        self.family = SDXL if model_family_of(patcher.model) == SDXL_FAMILY else SD1

    @property
    def unet_holder(self):
        return self.patcher.model  # BaseModel: calls its `diffusion_model`

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alpha_cumprod_of_sigma(model_sampling(self.patcher).sigmas.float())

    def denoise(self, x, sigma, cond):
        options = transformer_options(self.patcher, sigma)
        if isinstance(cond, dict):  # SDXL: the pooled-text/size vector goes in as `y`
            extra = dict(c_crossattn=cond["crossattn"], y=cond["vector"])
        else:
            extra = dict(c_crossattn=cond)
        return self.patcher.model.apply_model(x, sigma, transformer_options=options, **extra)

    # -- text -------------------------------------------------------------------------------------
    def _token_chunks(self, text: str) -> list:
        tokens = self.clip.tokenize(text)
        return tokens["l"] if "l" in tokens else next(iter(tokens.values()))

    def tokenize(self, text: str) -> list[int]:
        """Token ids laid out as the conditioning's rows, without BOS/EOS (`token_ids`)."""
        return token_ids(self._token_chunks(text), end_token=END_TOKEN)

    def _encode(self, text: str):
        tokens = self.clip.tokenize(text)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return cond, pooled

    @torch.no_grad()
    def conditioning(self, prompts, size: Optional[SizeTerms] = None, *, negative: bool = False):
        """ComfyUI encodes an empty negative prompt like any other (no zeroing): as its samplers do."""
        encoded = [self._encode(p) for p in prompts]
        device = self.device
        crossattn = torch.cat(pad_tokens([c.float() for c, _ in encoded])).to(device)
        if not self.is_sdxl:
            return crossattn
        size = size or SizeTerms.of_generation(1024, 1024, self.sdxl_crop)
        (h, w), (top, left), (th, tw) = size.original_hw, size.crop_top_left, size.target_hw
        vectors = [
            self.patcher.model.encode_adm(
                pooled_output=pooled,
                width=w,
                height=h,
                crop_w=left,
                crop_h=top,
                target_width=tw,
                target_height=th,
                device=device,
            )
            for _, pooled in encoded
        ]
        return {"crossattn": crossattn, "vector": torch.cat(vectors).float().to(device)}

    def eps(self, x, t, cond):
        self.load_model(self.patcher)
        return super().eps(x, t, cond)


class ComfySD:
    """ComfyUI's SD1.x and SDXL MODELs as the nodes ask about them (the questions:
    `adapters.comfy.ModelFamily`): ε-prediction, the library's DDIM retouch."""

    name = "SD1.x/SDXL"

    def matches(self, patcher) -> bool:
        """Every MODEL: `check_supported` refuses by name what no family runs."""
        return True

    def check_free(self, patcher, input_name: str = "model") -> None:
        check_attention_free(patcher, input_name)

    def encoder(self, encode: Callable, guidance: float) -> Callable:
        """CLIPTextEncode as it is (SD has no distilled guidance)."""
        return encode

    def continuation_noise(self, x: torch.Tensor, latent: torch.Tensor, sigma: float):
        """ε-models start a pass at x = latent + σ·noise and return x as it is."""
        return (x - latent) / sigma

    def stage1_layout_source(self) -> str:
        """ComfyUI's sampler gives no DDIM trajectory: the layout is inverted."""
        return "inversion"

    def model(self, patcher, clip, vae, *, load_model: Callable, sigmas: Callable, guidance):
        """`ComfyModel` (the library's DDIM; `sigmas` and `guidance` are the flow's)."""
        return ComfyModel(patcher, clip, vae, load_model=load_model)

    def check_schedule(self, lib_model, steps: int, latent_hw, scheduler: str) -> None:
        """The retouch runs the library's DDIM whatever ComfyUI's scheduler: nothing to refuse."""


COMFY_SD = ComfySD()
