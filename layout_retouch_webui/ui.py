"""The accordion: its controls (made from the parameter table `FIELDS`), hints, the live "At N
steps" line, the concept guess, and infotext paste back into the controls."""

from __future__ import annotations

import gradio as gr

from layout_retouch_webui import hosts, options, samplers
from layout_retouch_webui.api import has_lr_keys
from layout_retouch_webui.settings import checkpoint_choices, opt, sam_choices
from lib_layout_retouch import ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS, NO_SAM, LayoutRetouchParams
from lib_layout_retouch.prompts import guess_concept
from lib_layout_retouch.schedule import (
    PAPER_LAMBDA1,
    PAPER_LAMBDA2,
    PAPER_MASK_START,
    img2img_steps,
)

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
    if f.kind == "subjects":  # subjects 2 … (the API's list; the panel keeps it as a state)
        return gr.State(value=[])
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
        default_sam = opt(options.DEFAULT_SAM)
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


SCHEDULE_KNOBS = ("lambda1", "lambda2", "mask_start", "scale_with_steps")


class Panel:
    """The accordion of one tab (txt2img or img2img) while it is built: its components by parameter
    name, the choices' labels, and the extra components that are no parameter."""

    def __init__(self, script, is_img2img: bool):
        self.script = script
        self.is_img2img = is_img2img
        self.comps: dict = {}
        self.labels = {f.name: dict(zip(f.choices, f.choice_labels or f.choices)) for f in FIELDS}

    def make(self, name):
        self.comps[name] = control(FIELD_BY_NAME[name], self.labels, self.script.elem_id(name))
        return self.comps[name]

    def host(self, name):
        """The host's own box (prompt, steps, sampler, denoising strength) of this tab, or None."""
        box = self.script.host_components.get(name)
        if name == "denoising_strength" and not self.is_img2img:
            return None
        return box


def build(script, is_img2img: bool) -> list:
    """The accordion's components, in `FIELDS` order (the API's positional order). Sets the
    script's `infotext_fields` and `paste_field_names`."""
    from modules.ui_components import InputAccordion

    panel = Panel(script, is_img2img)
    enabled_field = FIELD_BY_NAME["enabled"]
    with InputAccordion(
        enabled_field.default, label=ui_text.ACCORDION_LABEL, elem_id=script.elem_id("enabled")
    ) as enabled:
        panel.comps["enabled"] = enabled
        gr.Markdown(ui_text.PANEL_INTRO)
        panel.photo_notice = gr.Markdown("", visible=False, elem_id=script.elem_id("photo_notice"))
        build_subject_row(panel)
        for name in SCHEDULE_KNOBS:
            panel.make(name)
        panel.effective = gr.Markdown(initial_effective(panel), elem_id=script.elem_id("effective"))
        for f in ui_text.basic_fields():
            if f.name not in panel.comps:
                panel.make(f.name)
        with gr.Accordion(ui_text.ADVANCED_LABEL, open=False, elem_id=script.elem_id("advanced")):
            for f in ui_text.advanced_fields():
                panel.make(f.name)
    wire_events(panel)
    set_paste_fields(panel)
    # api.EXTRA_ARGS after the parameters
    return [panel.comps[f.name] for f in FIELDS] + [panel.more_photos]


def build_subject_row(panel: Panel) -> None:
    """The photos on the left; model type, vanilla checkpoint, concept token, class and Guess."""
    from modules.ui_common import create_refresh_button
    from modules.ui_components import FormRow, ToolButton

    eid = panel.script.elem_id
    with gr.Row():
        with gr.Column(scale=1, min_width=200):
            panel.make("reference_image")
            # Photos 2…MAX_REFERENCES: one extra component after the FIELDS ones (api.EXTRA_ARGS).
            panel.more_photos = gr.File(
                label=ui_text.MORE_PHOTOS_LABEL,
                file_count="multiple",
                file_types=["image"],
                elem_id=eid("more_photos"),
            )
        with gr.Column(scale=2):
            panel.make("personalization")
            with FormRow(elem_id=eid("vanilla_row")) as panel.vanilla_row:
                panel.make("vanilla_checkpoint")
                create_refresh_button(
                    panel.comps["vanilla_checkpoint"],
                    hosts.current().refresh_checkpoints,
                    lambda: {"choices": checkpoint_choices()},
                    eid("vanilla_refresh"),
                )
            with FormRow():
                panel.make("concept_token")
                panel.make("class_phrase")
                panel.guess = ToolButton(
                    ui_text.GUESS_LABEL,
                    elem_id=eid("guess"),
                    tooltip=ui_text.EXTRA_HINTS[ui_text.GUESS_LABEL],
                )
            panel.guess_msg = gr.Markdown("", elem_id=eid("guess_message"))


def initial_effective(panel: Panel) -> str:
    """The "At N steps" line for the controls' and the host boxes' initial values."""
    steps = getattr(panel.host("steps"), "value", 20) or 20
    sampler = getattr(panel.host("sampler"), "value", None)
    strength = (
        getattr(panel.host("denoising_strength"), "value", 0.75) if panel.is_img2img else None
    )
    return describe_effective(
        PAPER_LAMBDA1, PAPER_LAMBDA2, PAPER_MASK_START, True, steps, strength, None, sampler
    )


def wire_events(panel: Panel) -> None:
    comps, labels = panel.comps, panel.labels
    kind = comps["personalization"]
    kind.change(
        lambda v: gr.update(visible=v == labels["personalization"]["dreambooth"]),
        inputs=[kind],
        outputs=[panel.vanilla_row],
        show_progress=False,
    )
    for photo in (comps["reference_image"], panel.more_photos):
        photo.upload(
            lambda: gr.update(value="", visible=False),
            outputs=[panel.photo_notice],
            show_progress=False,
        )
    wire_effective(panel)
    prompt_box = panel.host("prompt")
    if prompt_box is not None:
        panel.guess.click(
            guess_concept_ui,
            inputs=[prompt_box],
            outputs=[comps["concept_token"], comps["class_phrase"], panel.guess_msg],
            show_progress=False,
        )


def wire_effective(panel: Panel) -> None:
    """Keep the "At N steps" line current with the knobs, the steps, the sampler and (img2img) the
    denoising strength and layout source."""
    steps_box = panel.host("steps")
    if steps_box is None:
        return
    source_labels = {v: k for k, v in panel.labels["layout_source"].items()}
    strength_box = panel.host("denoising_strength")
    sampler_box = panel.host("sampler")
    extra = [b for b in (strength_box, sampler_box) if b is not None]
    inputs = [panel.comps[n] for n in SCHEDULE_KNOBS] + [steps_box, panel.comps["layout_source"]]
    inputs += extra

    def update(l1, l2, ms, scale, steps, source, *rest):
        rest = list(rest)
        strength = rest.pop(0) if strength_box is not None else None
        sampler = rest.pop(0) if sampler_box is not None else None
        return describe_effective(
            l1, l2, ms, scale, steps, strength, source_labels.get(source, source), sampler
        )

    for c in inputs:
        c.change(update, inputs=inputs, outputs=[panel.effective], show_progress=False)


def set_paste_fields(panel: Panel) -> None:
    script, comps = panel.script, panel.comps
    script.infotext_fields = [
        (comps["enabled"], lambda d: True if has_lr_keys(d) else None),
        (panel.photo_notice, lambda d: paste_notice(d, panel)),
    ]
    for f in FIELDS:
        if f.infotext_key and f.kind != "image":
            script.infotext_fields.append(
                (comps[f.name], paste_reader(f.name, panel.labels.get(f.name, {}), panel))
            )
    script.paste_field_names = [f.infotext_key for f in FIELDS if f.infotext_key]


def paste_notice(d, panel=None):
    if not has_lr_keys(d):
        return gr.update(value="", visible=False)
    notice = ui_text.photo_notice(d.get(FIELD_BY_NAME["reference_image"].infotext_key))
    if panel is not None and not panel.is_img2img and pasted_input_source(d):
        notice += "\n\n" + ui_text.input_source_in_txt2img()
    return gr.update(value=notice, visible=True)


def pasted_input_source(d) -> bool:
    """Whether pasted parameters carry img2img's layout source 'input' (no use in txt2img)."""
    return LayoutRetouchParams.from_infotext(d).get("layout_source") == "input"


def describe_effective(l1, l2, ms, scale, steps, strength=None, source=None, sampler=None):
    """The "At N steps" line. img2img (`strength` given): at the steps its sampler runs
    (steps × denoising strength), or — layout source 'input' — all the steps, strength unused.
    `sampler`: what the host's sampler really runs in stage 1 (DDIM at 10 steps runs 9)."""
    try:
        params = LayoutRetouchParams(lambda1=l1, lambda2=l2, mask_start=ms, scale_with_steps=scale)
        steps = int(steps)
        if strength is not None and source == "input":
            return (
                f"At {steps} steps (the input image retouched over all of them; no stage 1, "
                f"denoising strength not used): {params.schedule(steps).describe(stage1=False)}"
            )
        if strength is None:
            run, where = steps, ""
        else:
            run = img2img_steps(steps, float(strength), bool(opt("img2img_fix_steps", False)))
            where = f" (img2img runs {run} of {steps} at denoising strength {float(strength):g})"
        schedule = params.schedule(run)
        return f"At {run} steps{where}: {schedule.describe()}" + stage1_words(
            schedule.lambda1, sampler, steps, strength
        )
    except LayoutRetouchError as e:
        return f"⚠ {ui_text.for_ui(str(e))}"


def stage1_words(lambda1: int, sampler, steps: int, strength) -> str:
    """ "; stage 1: DDIM runs 9 steps for 10 (…)" when the sampler's steps are not the slider's;
    a warning when λ1 leaves the personalized model no step."""
    if not sampler:
        return ""
    plan = samplers.planned(str(sampler), steps, None if strength is None else float(strength))
    if lambda1 and not plan.known:
        return f" — ⚠ {plan.words()}: set λ1 to 0 or choose another sampler (the paper's is DDIM)"
    if lambda1 and lambda1 > plan.steps - 1:
        return (
            f" — ⚠ {plan.words() or f'{plan.sampler} runs {plan.steps} steps'}: λ1 must be at most "
            f"{max(plan.steps - 1, 0)} (the personalized model needs a step)"
        )
    words = plan.words()
    return f"; stage 1: {words}" if words and lambda1 else ""


def guess_concept_ui(prompt):
    names = hosts.current().embedding_names() or []
    found = guess_concept(prompt or "", names)
    message = ui_text.guess_message(prompt, found, names)
    if not found:
        return gr.update(), gr.update(), message
    return found[0], found[1] or gr.update(), message


def paste_reader(name, labels, panel=None):
    def read(d):
        values = LayoutRetouchParams.from_infotext(d)
        if name not in values:
            return None
        v = values[name]
        if name == "vanilla_checkpoint" and not v:
            return None
        if name == "layout_source" and v == "input" and panel is not None and not panel.is_img2img:
            v = FIELD_BY_NAME["layout_source"].default  # 'input' is img2img's; the notice says so
        return labels.get(v, v) if labels else v

    return read
