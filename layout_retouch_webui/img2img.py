"""img2img and inpaint: what differs from txt2img, in one place.

- **Steps.** img2img's sampler runs `t_enc + 1` of the slider's steps (denoising strength; the
  setting "do exactly the amount of steps the slider specifies"): stage 1 and the retouch are
  scheduled over the steps actually run (`steps_run`), so λ1/λ2/mask start scale with them and the
  "At N steps" line and the infotext show those values. With `layout_source = input` there is no
  stage 1: the input itself is inverted and retouched over the slider's steps, and the denoising
  strength is not used (a note says so).
- **Inpaint** (inpaint, inpaint sketch, upload mask): after the WebUI's img2img `sample()` the latents
  are already `samples·nmask + init_latent·mask`; the retouch gets `p.nmask` (1 where the user
  painted, `Mask mode` already applied, at latent resolution, in the crop for "Only masked") as its
  user mask, so it keeps the input's latents where the mask is 0, and the WebUI's own overlay then
  puts the input's pixels back outside the mask, as in plain inpainting.
- **Refused** with a message (never silently ignored): a mask whose size is not the input's, an empty
  mask, Soft inpainting (it replaces the WebUI's mask blend and overlay), and `input` with the masked
  content "latent noise"/"latent nothing" (there is no input left inside the mask to retouch).
"""

from __future__ import annotations

from layout_retouch_webui import options
from layout_retouch_webui.options import opt
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.schedule import img2img_steps

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # p.inpainting_fill 0…3
SOFT_INPAINTING_TITLE = "soft inpainting"


def is_img2img(p) -> bool:
    try:
        from modules.processing import StableDiffusionProcessingImg2Img
    except ImportError:  # not in a WebUI (library tests)
        return False
    return isinstance(p, StableDiffusionProcessingImg2Img)


def is_inpaint(p) -> bool:
    return is_img2img(p) and getattr(p, "image_mask", None) is not None


def fix_steps() -> bool:
    return bool(opt(options.IMG2IMG_FIX_STEPS))


def steps_run(p, layout_source: str) -> int:
    """The steps both stages are scheduled over: txt2img's steps; img2img's steps actually run; with
    layout source `input` the slider's steps (the whole input is inverted and retouched)."""
    if not is_img2img(p) or layout_source == "input":  # 'input': no stage 1 (params.runs_stage1)
        return int(p.steps)
    return img2img_steps(int(p.steps), float(p.denoising_strength), fix_steps())


def steps_words(p, layout_source: str) -> str:
    """Where the step count came from, for messages: "" in txt2img."""
    if not is_img2img(p):
        return ""
    if layout_source == "input":
        return f"layout source 'input' retouches over all {p.steps} steps (denoising strength not used)"
    n = steps_run(p, layout_source)
    return f"img2img runs {n} of the {p.steps} steps at denoising strength {float(p.denoising_strength):g}"


def check(p, params) -> None:
    """img2img's own refusals, before any compute (the steps it runs: `checks.check_schedule`)."""
    if not is_img2img(p):
        return
    source = params.layout_source
    if soft_inpainting_on(p):
        raise LayoutRetouchError(
            "Soft inpainting replaces the WebUI's mask blend and overlay, which the retouch "
            "relies on to keep the input outside the mask: turn Soft inpainting off for "
            "retouched images",
            parameter="soft_inpainting",
        )
    if getattr(p, "image_mask", None) is not None:
        check_mask(p)
        fill = int(getattr(p, "inpainting_fill", 1) or 0)
        if source == "input" and fill in (2, 3):
            raise LayoutRetouchError(
                f"layout source 'input' retouches the input image, but Masked content '{MASKED_CONTENT[fill]}' "
                "replaces it inside the mask before anything runs: set Masked content to 'original' (or "
                "choose another layout source)",
                parameter="inpainting_fill",
            )


def check_mask(p) -> None:
    """The user's mask must be the input's size (the WebUI would stretch it over another picture)
    and mark something (an empty mask retouches nothing)."""
    from modules.processing import create_binary_mask

    mask = p.image_mask
    images = list(getattr(p, "init_images", None) or [])
    for i, img in enumerate(images):
        if img is not None and tuple(img.size) != tuple(mask.size):
            which = "the input image" if len(images) == 1 else f"input image {i + 1}"
            raise LayoutRetouchError(
                f"the inpaint mask is {mask.size[0]}×{mask.size[1]} but {which} is {img.size[0]}×{img.size[1]}: "
                "give a mask of the input's size",
                parameter="mask",
            )
    binary = create_binary_mask(mask, round=bool(getattr(p, "mask_round", True)))
    lo, hi = binary.getextrema()
    # The WebUI rounds the latent mask (`mask_round`): a pixel counts from 128 on.
    cut = 128 if getattr(p, "mask_round", True) else 1
    painted = hi >= cut if not getattr(p, "inpainting_mask_invert", 0) else lo <= 255 - cut
    if not painted:
        where = (
            "everything is masked and Mask mode is 'Inpaint not masked'"
            if getattr(p, "inpainting_mask_invert", 0)
            else "nothing is painted"
        )
        raise LayoutRetouchError(
            f"the inpaint mask is empty ({where}): paint where the subject is, or use "
            "img2img without a mask",
            parameter="mask",
        )


def soft_inpainting_on(p) -> bool:
    """Whether the built-in Soft inpainting script is enabled for this inpaint generation."""
    if getattr(p, "image_mask", None) is None:
        return False
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", []) or []:
        try:
            title = str(script.title()).strip().lower()
        except Exception:
            continue
        if title == SOFT_INPAINTING_TITLE:
            args = list(getattr(p, "script_args", None) or [])[script.args_from : script.args_to]
            return bool(args and args[0])
    return False


def user_mask(p):
    """Inpaint: (1, 1, h, w) in [0, 1] at latent resolution, 1 where the user painted (the mode
    "Inpaint not masked" is already applied by the WebUI); None for plain img2img."""
    nmask = getattr(p, "nmask", None) if is_img2img(p) else None
    if nmask is None:
        return None
    return nmask[:1].unsqueeze(0).float().clamp(0, 1)


def notes(p, run) -> None:
    """What img2img changes, said in the infotext."""
    if not is_img2img(p):
        return
    params = run.params
    fill = int(getattr(p, "inpainting_fill", 1) or 0)
    if params.layout_source == "input":
        run.job.add_note(
            f"layout source 'input': the input image was retouched over {p.steps} steps; "
            "denoising strength not used"
        )
        if getattr(p, "image_mask", None) is not None and fill == 0:
            run.job.add_note(
                "Masked content 'fill' replaced the input inside the mask before the retouch"
            )
