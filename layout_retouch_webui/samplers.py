"""Which family the generation's sampler is, and the steps it will really run (`lib_layout_retouch.
sampler_steps` has the arithmetic and why). A1111 and Forge share `modules/sd_samplers_*.py`: the
same DDIM / PLMS / UniPC loops and k-diffusion samplers, and the same `CFGDenoiser.step` counter of
model calls that stage 1 switches on."""

from __future__ import annotations

from layout_retouch_webui.settings import opt
from lib_layout_retouch import sampler_steps as ss

SECOND_ORDER_UNKNOWN = ("restart",)  # second_order in the WebUI's table, but calls vary
UNKNOWN_FUNCS = ("sample_dpm_fast", "sample_dpm_adaptive")


def family_of(name: str) -> tuple[str, bool]:
    """(family, discard penultimate sigma) of sampler `name` (label or alias)."""
    try:
        from modules import sd_samplers
    except ImportError:  # not in a WebUI (library tests)
        return ss.UNKNOWN, False
    config = sd_samplers.find_sampler_config(name)
    if config is None:
        return ss.UNKNOWN, False
    options = dict(getattr(config, "options", None) or {})
    discard = bool(options.get("discard_next_to_last_sigma")) or bool(
        opt("always_discard_next_to_last_sigma", False)
    )
    aliases = [str(a).lower() for a in (getattr(config, "aliases", None) or [])]
    label = str(config.name).lower()
    if any(a in ("ddim", "ddim_cfgpp") for a in aliases):
        return ss.DDIM_LIKE, discard
    if "plms" in aliases:
        return ss.PLMS, discard
    if "unipc" in aliases:
        return ss.UNIPC, discard
    if label in SECOND_ORDER_UNKNOWN or any(a in SECOND_ORDER_UNKNOWN for a in aliases):
        return ss.UNKNOWN, discard
    if any(a in ("k_dpm_fast", "k_dpm_ad") for a in aliases) or label.startswith("dpm fast"):
        return ss.UNKNOWN, discard
    if "dpm adaptive" in label:
        return ss.UNKNOWN, discard
    if options.get("second_order"):
        return ss.SECOND_ORDER, discard
    return ss.FIRST_ORDER, discard


def fix_steps() -> bool:
    return bool(opt("img2img_fix_steps", False))


def planned(sampler: str, steps: int, strength: float | None = None) -> ss.SamplerSteps:
    """The steps `sampler` runs for the slider's `steps` (img2img: at denoising `strength`)."""
    family, discard = family_of(sampler)
    if strength is None:
        return ss.sampler_steps(sampler, family, steps, discard_penultimate=discard)
    full, t_enc = ss.img2img_t_enc(steps, strength, fix_steps())
    return ss.sampler_steps(
        sampler,
        family,
        steps,
        img2img_t_enc=t_enc,
        img2img_steps=full,
        discard_penultimate=discard,
        requested=steps,
    )


def of(p) -> ss.SamplerSteps:
    """What generation `p`'s sampler will run."""
    from layout_retouch_webui.img2img import is_img2img

    strength = float(p.denoising_strength) if is_img2img(p) else None
    return planned(str(getattr(p, "sampler_name", "") or ""), int(p.steps), strength)
