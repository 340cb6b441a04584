"""Forge's engines as the retouch sees them: which it refuses, and which other extension's attention
replacement would bypass the layers the retouch edits (facts: Forge dfdcbab6,
`backend/diffusion_engine/*.py`, `backend/patcher/unet.py`)."""

from __future__ import annotations

from ...errors import LayoutRetouchError
from ...unet.model import inpaint_refusal, prediction_refusal

# Forge's model kinds by engine class (`backend/diffusion_engine/*.py`) that the retouch cannot run on.
UNSUPPORTED_FORGE_ENGINES = {
    # Flux.1 is claimed by its own adapter before this table is read (`adapters.forge.FAMILIES`, the
    # SD adapter last); this entry is for a Flux engine whose predictor is not Forge's flow
    # prediction, which the Flux model interface cannot drive.
    "Flux": "this Flux engine (its predictor is not Forge's PredictionFlux, so the flow sampler "
    "the retouch inverts with is unknown)",
    "Chroma": "Chroma (a Flux-derived DiT without CLIP-L or Flux's guidance embedding, its "
    "modulation from a separate approximator; the DiT retouch is verified on Flux.1 only)",
    "StableDiffusion3": "SD3/SD3.5 (an MMDiT with joint blocks only, no rotary positions and three "
    "text encoders; the DiT retouch is written for Flux.1's double/single-stream blocks)",
    "StableDiffusionXLRefiner": "the SDXL refiner (not a personalized model; it cannot draw a layout)",
}


def check_forge_engine_supported(engine) -> None:
    """`check_model_supported` for a Forge `ForgeDiffusionEngine`: refused by engine class (the
    refiner also says `is_sdxl`), then by what the UNet patcher says (inpaint, prediction type)."""
    kind = type(engine).__name__
    if kind in UNSUPPORTED_FORGE_ENGINES:
        raise LayoutRetouchError(
            f"{UNSUPPORTED_FORGE_ENGINES[kind]} is not supported; load an SD1.x, SDXL or Flux.1 checkpoint",
            parameter="sd_model",
        )
    objects = getattr(engine, "forge_objects", None)
    kmodel = getattr(getattr(objects, "unet", None), "model", None)
    if getattr(kmodel, "diffusion_model", None) is None or not (
        getattr(engine, "is_sd1", False) or getattr(engine, "is_sdxl", False)
    ):
        raise LayoutRetouchError(
            f"the loaded model ({kind}) is neither SD1.x nor SDXL; load an SD1.x or SDXL "
            "checkpoint",
            parameter="sd_model",
        )
    if getattr(engine, "is_inpaint", False):
        raise inpaint_refusal()
    prediction = getattr(getattr(kmodel, "predictor", None), "prediction_type", "epsilon")
    if prediction not in ("epsilon", "eps"):
        raise prediction_refusal(f"{prediction} models (e.g. v-prediction)")


def attention_replacements(model_options: dict) -> list[str]:
    """Which attention kinds ('attn1', 'attn2') another extension replaced through Forge's
    `set_model_attn*_replace` / `set_model_replace_all`: the UNet block then calls that patch instead
    of the module, so the retouch's per-module editors would never run."""
    replaced = ((model_options or {}).get("transformer_options") or {}).get("patches_replace") or {}
    return sorted(k for k, v in replaced.items() if v and k in ("attn1", "attn2"))
