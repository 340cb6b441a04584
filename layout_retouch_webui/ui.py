"""The accordion: its controls (made from the parameter table `FIELDS`), hints, the live "At N
steps" line, the concept guess, and infotext paste back into the controls."""

from __future__ import annotations

import gradio as gr

from lib_layout_retouch import ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS, NO_SAM, LayoutRetouchParams
from lib_layout_retouch.prompts import guess_concept
from lib_layout_retouch.schedule import img2img_steps

from . import hosts
from .api import has_lr_keys
from .settings import checkpoint_choices, opt, sam_choices

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def image_input(label: str, elem_id: str):
    if GRADIO_4:  # `source` became `sources` (a list) in gradio 4 (Forge)
        return gr.Image(label=label, type="pil", sources=["upload"], elem_id=elem_id, height=256)
    return gr.Image(label=label, type="pil", source="upload", elem_id=elem_id, height=256)


def control(f, labels, eid: str):
    """The control of parameter `f`."""
    if f.kind == "bool":
        return gr.Checkbox(value=f.default, label=f.label, elem_id=eid)
    if f.kind == "image":
        return image_input(f.label, eid)
    if f.kind == "choice":
        return gr.Radio(
            choices=list(labels[f.name].values()),
            value=labels[f.name][f.default],
            label=f.label,
            elem_id=eid,
        )
    if f.name == "vanilla_checkpoint":
        # value "" (no empty choice in the list): the API's infotext paste converts a pasted value
        # to the type of the component's value, and a None value would drop the paste.
        return gr.Dropdown(
            choices=checkpoint_choices(),
            value="",
            label=f.label,
            elem_id=eid,
            **({"allow_custom_value": True} if GRADIO_4 else {}),
        )
    if f.name == "sam_model":
        choices = sam_choices()
        default_sam = opt("layout_retouch_default_sam", NO_SAM)
        return gr.Dropdown(
            choices=choices,
            value=default_sam if default_sam in choices else NO_SAM,
            label=f.label,
            elem_id=eid,
        )
    if f.kind in ("int", "float"):
        low, high = f.slider_range()
        return gr.Slider(
            minimum=low, maximum=high, step=f.step, value=f.default, label=f.label, elem_id=eid
        )
    if f.choices:  # a text field with a fixed set of values (e.g. a preset)
        return gr.Radio(
            choices=list(labels[f.name].values()),
            value=labels[f.name][f.default],
            label=f.label,
            elem_id=eid,
        )
    return gr.Textbox(value=f.default, label=f.label, elem_id=eid, lines=1, max_lines=1)


def build(script, is_img2img: bool) -> list:
    """The accordion's components, in `FIELDS` order (the API's positional order). Sets the
    script's `infotext_fields` and `paste_field_names`."""
    from modules.ui_common import create_refresh_button
    from modules.ui_components import FormRow, InputAccordion, ToolButton

    comps = {}
    labels = {f.name: dict(zip(f.choices, f.choice_labels or f.choices)) for f in FIELDS}
    made = set()

    def make(name):
        comps[name] = control(FIELD_BY_NAME[name], labels, script.elem_id(name))
        made.add(name)
        return comps[name]

    enabled_field = FIELD_BY_NAME["enabled"]
    with InputAccordion(
        enabled_field.default, label=ui_text.ACCORDION_LABEL, elem_id=script.elem_id("enabled")
    ) as enabled:
        comps["enabled"] = enabled
        made.add("enabled")
        gr.Markdown(
            "Vanilla model draws the layout, your subject is retouched in from its photo (up to 4) "
            "([paper](https://arxiv.org/abs/2407.09779)). Stage 1 works with any sampler; "
            "the paper used **DDIM**."
        )
        photo_notice = gr.Markdown("", visible=False, elem_id=script.elem_id("photo_notice"))
        with gr.Row():
            with gr.Column(scale=1, min_width=200):
                make("reference_image")
                # Photos 2…MAX_REFERENCES: one extra component after the FIELDS ones (api.EXTRA_ARGS).
                more_photos = gr.File(
                    label=ui_text.MORE_PHOTOS_LABEL,
                    file_count="multiple",
                    file_types=["image"],
                    elem_id=script.elem_id("more_photos"),
                )
            with gr.Column(scale=2):
                make("personalization")
                with FormRow(elem_id=script.elem_id("vanilla_row")) as vanilla_row:
                    make("vanilla_checkpoint")
                    create_refresh_button(
                        comps["vanilla_checkpoint"],
                        hosts.current().refresh_checkpoints,
                        lambda: {"choices": checkpoint_choices()},
                        script.elem_id("vanilla_refresh"),
                    )
                with FormRow():
                    make("concept_token")
                    make("class_phrase")
                    guess = ToolButton(
                        ui_text.GUESS_LABEL,
                        elem_id=script.elem_id("guess"),
                        tooltip=ui_text.EXTRA_HINTS[ui_text.GUESS_LABEL],
                    )
                guess_msg = gr.Markdown("", elem_id=script.elem_id("guess_message"))
        for name in ("lambda1", "lambda2", "mask_start", "scale_with_steps"):
            make(name)
        steps_now = getattr(script.host_components.get("steps"), "value", 20) or 20
        strength_box = script.host_components.get("denoising_strength") if is_img2img else None
        strength_now = getattr(strength_box, "value", 0.75) if is_img2img else None
        effective = gr.Markdown(
            describe_effective(5, 10, 31, True, steps_now, strength_now),
            elem_id=script.elem_id("effective"),
        )
        for f in ui_text.basic_fields():
            if f.name not in made:
                make(f.name)
        with gr.Accordion(ui_text.ADVANCED_LABEL, open=False, elem_id=script.elem_id("advanced")):
            for f in ui_text.advanced_fields():
                make(f.name)

    kind = comps["personalization"]
    kind.change(
        lambda v: gr.update(visible=v == labels["personalization"]["dreambooth"]),
        inputs=[kind],
        outputs=[vanilla_row],
        show_progress=False,
    )
    for photo in (comps["reference_image"], more_photos):
        photo.upload(
            lambda: gr.update(value="", visible=False), outputs=[photo_notice], show_progress=False
        )
    prompt_box = script.host_components.get("prompt")
    steps_box = script.host_components.get("steps")
    knobs = [comps[n] for n in ("lambda1", "lambda2", "mask_start", "scale_with_steps")]
    if steps_box is not None:
        inputs = knobs + [steps_box]
        update = describe_effective
        if is_img2img and strength_box is not None:
            source_labels = {v: k for k, v in labels["layout_source"].items()}
            inputs = inputs + [strength_box, comps["layout_source"]]

            def update(l1, l2, ms, scale, steps, strength, source):
                return describe_effective(
                    l1, l2, ms, scale, steps, strength, source_labels.get(source, source)
                )

        for c in inputs:
            c.change(update, inputs=inputs, outputs=[effective], show_progress=False)
    if prompt_box is not None:
        guess.click(
            guess_concept_ui,
            inputs=[prompt_box],
            outputs=[comps["concept_token"], comps["class_phrase"], guess_msg],
            show_progress=False,
        )

    script.infotext_fields = [
        (comps["enabled"], lambda d: True if has_lr_keys(d) else None),
        (photo_notice, paste_notice),
    ]
    for f in FIELDS:
        if f.infotext_key and f.kind != "image":
            script.infotext_fields.append(
                (comps[f.name], paste_reader(f.name, labels.get(f.name, {})))
            )
    script.paste_field_names = [f.infotext_key for f in FIELDS if f.infotext_key]
    return [comps[f.name] for f in FIELDS] + [more_photos]  # api.EXTRA_ARGS after the parameters


def paste_notice(d):
    if not has_lr_keys(d):
        return gr.update(value="", visible=False)
    return gr.update(
        value=ui_text.photo_notice(d.get(FIELD_BY_NAME["reference_image"].infotext_key)),
        visible=True,
    )


def describe_effective(l1, l2, ms, scale, steps, strength=None, source=None):
    """The "At N steps" line. img2img (`strength` given): at the steps its sampler runs
    (steps × denoising strength), or — layout source 'input' — all the steps, strength unused."""
    try:
        params = LayoutRetouchParams(lambda1=l1, lambda2=l2, mask_start=ms, scale_with_steps=scale)
        steps = int(steps)
        if strength is None:
            return f"At {steps} steps: {params.schedule(steps).describe()}"
        if source == "input":
            return (
                f"At {steps} steps (the input image retouched over all of them; denoising strength not "
                f"used): {params.schedule(steps).describe()}"
            )
        run = img2img_steps(steps, float(strength), bool(opt("img2img_fix_steps", False)))
        return (
            f"At {run} steps (img2img runs {run} of {steps} at denoising strength {float(strength):g}): "
            f"{params.schedule(run).describe()}"
        )
    except LayoutRetouchError as e:
        return f"⚠ {ui_text.for_ui(str(e))}"


def guess_concept_ui(prompt):
    names = hosts.current().embedding_names() or []
    found = guess_concept(prompt or "", names)
    message = ui_text.guess_message(prompt, found, names)
    if not found:
        return gr.update(), gr.update(), message
    return found[0], found[1] or gr.update(), message


def paste_reader(name, labels):
    def read(d):
        values = LayoutRetouchParams.from_infotext(d)
        if name not in values:
            return None
        v = values[name]
        if name == "vanilla_checkpoint" and not v:
            return None
        return labels.get(v, v) if labels else v

    return read
