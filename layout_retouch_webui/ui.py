"""The accordion: its controls (made from the parameter table `FIELDS`), hints, the live "At N
steps" line, the concept guess, and infotext paste back into the controls."""

from __future__ import annotations

import types

import gradio as gr

from layout_retouch_webui import api, hosts, options, samplers
from layout_retouch_webui.api import has_lr_keys
from layout_retouch_webui.settings import (
    checkpoint_choices,
    checkpoint_unet_shapes,
    generating_checkpoint,
    not_offered,
    opt,
    sam_choices,
    same_checkpoint,
)
from lib_layout_retouch import logs, ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.images import find_fingerprints
from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS, NO_SAM, LayoutRetouchParams
from lib_layout_retouch.prompts import guess_concept
from lib_layout_retouch.schedule import (
    PAPER_LAMBDA1,
    PAPER_LAMBDA2,
    PAPER_MASK_START,
    effective_values,
    img2img_steps,
    knob_bounds,
    unscaled_values,
)

logger = logs.attach_console()

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def image_input(label: str, elem_id: str):
    if GRADIO_4:  # `source` became `sources` (a list) in gradio 4 (Forge)
        return gr.Image(label=label, type="pil", sources=["upload"], elem_id=elem_id, height=256)
    return gr.Image(label=label, type="pil", source="upload", elem_id=elem_id, height=256)


# Choices only img2img has (txt2img does not offer them; a pasted one falls back to the default).
IMG2IMG_ONLY = {"layout_source": ("input",)}


def control(f, labels, eid: str, is_img2img: bool = True):
    """The control of parameter `f` (in txt2img without img2img's own choices)."""
    if f.kind == "bool":
        return gr.Checkbox(value=f.default, label=f.label, elem_id=eid)
    if f.kind == "image":
        return image_input(f.label, eid)
    if f.kind == "subjects":  # subjects 2 … (the API's list; the panel keeps it as a state)
        return gr.State(value=[])
    if f.kind == "choice":
        hidden = () if is_img2img else IMG2IMG_ONLY.get(f.name, ())
        return gr.Radio(
            choices=[label for value, label in labels[f.name].items() if value not in hidden],
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
        self.comps[name] = control(
            FIELD_BY_NAME[name], self.labels, self.script.elem_id(name), self.is_img2img
        )
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
    if not is_img2img:
        PANELS.clear()  # a new page (txt2img is built first): the panels of an earlier one are gone
    PANELS.append(panel)  # the page's checkpoint dropdown, built later, is wired to it
    # api.EXTRA_ARGS after the parameters
    return [panel.comps[f.name] for f in FIELDS] + [panel.more_photos]


def build_subject_row(panel: Panel) -> None:
    """The photos on the left; model type, vanilla checkpoint, concept token, class and Guess."""
    from modules.ui_common import refresh_symbol
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
                panel.vanilla_refresh = ToolButton(
                    value=refresh_symbol,
                    elem_id=eid("vanilla_refresh"),
                    tooltip=ui_text.VANILLA_REFRESH_HINT,
                )
            panel.vanilla_notice = gr.Markdown("", visible=False, elem_id=eid("vanilla_notice"))
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
    dreambooth = labels["personalization"]["dreambooth"]
    kind.change(
        lambda v: (
            gr.update(visible=v == dreambooth),
            gr.update() if v == dreambooth else gr.update(visible=False),
        ),
        inputs=[kind],
        outputs=[panel.vanilla_row, panel.vanilla_notice],
        show_progress=False,
    )
    for photo in (comps["reference_image"], panel.more_photos):
        photo.upload(
            lambda: gr.update(value="", visible=False),
            outputs=[panel.photo_notice],
            show_progress=False,
        )
    # after a paste: no "upload the photo again" when the photos used are the ones loaded
    panel.photo_notice.change(
        photos_loaded_notice,
        inputs=[panel.photo_notice, comps["reference_image"], panel.more_photos],
        outputs=[panel.photo_notice],
        show_progress=False,
    )
    vanilla = comps["vanilla_checkpoint"]
    panel.vanilla_refresh.click(
        lambda current: refresh_vanilla(panel, current),
        inputs=[vanilla],
        outputs=[vanilla, panel.vanilla_notice],
        show_progress=False,
    )
    vanilla.input(
        lambda: gr.update(value="", visible=False),
        outputs=[panel.vanilla_notice],
        show_progress=False,
    )
    wire_effective(panel)
    wire_scale(panel)
    prompt_box = panel.host("prompt")
    if prompt_box is not None:
        panel.guess.click(
            guess_concept_ui,
            inputs=[prompt_box],
            outputs=[comps["concept_token"], comps["class_phrase"], panel.guess_msg],
            show_progress=False,
        )


# --- the vanilla checkpoint list follows the page's checkpoint -----------------------------------
PANELS: list[
    Panel
] = []  # built panels whose vanilla list is not yet wired to the page's checkpoint


def on_after_component(component, **kwargs) -> None:
    """`script_callbacks.on_after_component`: the page's checkpoint dropdown (built after the tabs)
    drives every panel's vanilla list: a change of the model re-lists the vanilla candidates for it
    and clears a choice that no longer fits, with a notice."""
    if not PANELS or not hosts.current().is_checkpoint_selector(kwargs):
        return
    from gradio.context import Context

    panels = list(PANELS)
    PANELS.clear()
    for panel in panels:
        vanilla = panel.comps["vanilla_checkpoint"]
        outputs = [vanilla, panel.vanilla_notice]
        try:
            component.change(
                lambda selected, current, panel=panel: follow_checkpoint(panel, selected, current),
                inputs=[component, vanilla],
                outputs=outputs,
                show_progress=False,
            )
            # a page opened after the model changed elsewhere (API, another tab) lists for it too
            Context.root_block.load(
                lambda current, panel=panel: vanilla_update(panel, current, None),
                inputs=[vanilla],
                outputs=outputs,
                show_progress=False,
            )
        except Exception as e:  # a host whose page cannot be wired: the 🔄 and the checks remain
            logger.info(f"the vanilla list cannot follow the checkpoint dropdown: {e}")


def follow_checkpoint(panel: Panel, selected, current):
    """The page's checkpoint changed to `selected`: the vanilla candidates for it; a chosen vanilla
    checkpoint that no longer fits is cleared, with a notice saying why."""
    return vanilla_update(panel, current, selected or None)


def refresh_vanilla(panel: Panel, current):
    """🔄: re-read the checkpoint folder (never changing the model the WebUI generates with) and
    re-list the candidates for the chosen model."""
    hosts.current().refresh_checkpoints()
    return vanilla_update(panel, current, None)


def vanilla_update(panel: Panel, current, selected):
    choices = checkpoint_choices(selected)
    if not current:
        return gr.update(choices=choices), gr.update()
    kept = same_checkpoint(current, choices)
    if kept is not None:
        return gr.update(choices=choices, value=kept), gr.update()
    target = generating_checkpoint(selected)
    why = not_offered(current, target, checkpoint_unet_shapes(target)) or "no longer fits"
    return (
        gr.update(choices=choices, value=""),
        gr.update(value=ui_text.vanilla_cleared(current, why), visible=True),
    )


# --- the reference photos after a paste ------------------------------------------------------------
def photos_loaded_notice(notice, photo, more):
    """The "upload the photos again" notice of a paste, replaced by a calm one when every photo used
    (the fingerprints it names) is the one loaded in the panel."""
    used = find_fingerprints(notice or "")
    if not used or not str(notice).startswith("⚠"):
        return gr.update()
    loaded = set(loaded_fingerprints(photo, more))
    if not set(used) <= loaded:
        return gr.update()
    return gr.update(value=ui_text.photos_still_loaded(used), visible=True)


def loaded_fingerprints(photo, more) -> list[str]:
    """Fingerprints of the photos in the panel, as a generation would record them."""
    try:
        params = LayoutRetouchParams(reference_image=photo)
        if more:
            params = api.with_more_photos(types.SimpleNamespace(is_api=False), params, more)
        return params.reference_fingerprints()
    except LayoutRetouchError:  # a photo still uploading, or not an image: none counts
        return []


# --- λ1, λ2, mask start: the line under them, and their values when scaling is switched ----------
def tab_inputs(panel: Panel) -> tuple[list, callable]:
    """The knobs, the host's steps / layout source / strength / sampler boxes as event inputs, and
    a reader of those values: (l1, l2, mask, scale, steps, source, strength, sampler)."""
    steps_box = panel.host("steps")
    strength_box = panel.host("denoising_strength")
    sampler_box = panel.host("sampler")
    source_labels = {v: k for k, v in panel.labels["layout_source"].items()}
    extra = [b for b in (strength_box, sampler_box) if b is not None]
    inputs = [panel.comps[n] for n in SCHEDULE_KNOBS] + [steps_box, panel.comps["layout_source"]]
    inputs += extra

    def read(l1, l2, ms, scale, steps, source, *rest):
        rest = list(rest)
        strength = rest.pop(0) if strength_box is not None else None
        sampler = rest.pop(0) if sampler_box is not None else None
        return l1, l2, ms, scale, steps, source_labels.get(source, source), strength, sampler

    return inputs, read


def wire_effective(panel: Panel) -> None:
    """Keep the "At N steps" line current with the knobs, the steps, the sampler and (img2img) the
    denoising strength and layout source."""
    if panel.host("steps") is None:
        return
    inputs, read = tab_inputs(panel)

    def update(*values):
        l1, l2, ms, scale, steps, source, strength, sampler = read(*values)
        return describe_effective(l1, l2, ms, scale, steps, strength, source, sampler)

    for c in inputs:
        c.change(update, inputs=inputs, outputs=[panel.effective], show_progress=False)


def wire_scale(panel: Panel) -> None:
    """Switching "scale with steps" puts in the values in use at this step count (off), or their
    equivalents for 50 steps (on), and the sliders' ranges; the ranges follow the steps, sampler
    and (img2img) denoising strength while scaling is off."""
    if panel.host("steps") is None:
        return
    inputs, read = tab_inputs(panel)
    knobs = [panel.comps[n] for n in SCHEDULE_KNOBS[:3]]
    scale = panel.comps["scale_with_steps"]

    def switched(*values):
        return knob_updates(*read(*values), values_too=True)

    def ranges(*values):
        return knob_updates(*read(*values), values_too=False)

    scale.input(switched, inputs=inputs, outputs=knobs, show_progress=False)
    for c in [scale] + inputs[4:]:
        c.change(ranges, inputs=inputs, outputs=knobs, show_progress=False)


def knob_updates(l1, l2, ms, scale, steps, source, strength, sampler, values_too: bool):
    """Slider updates of λ1, λ2 and mask start for "scale with steps" = `scale`: on, the paper's
    ranges for 50 steps; off, the ranges at the steps run (λ1's is the sampler's). With
    `values_too` (the user switched it) also the values: those in use, or their 50-step ones."""
    try:
        steps = int(steps)
        run, _ = steps_run(steps, strength, source)
        plan = stage1_plan(sampler, steps, strength, source)
        values = [int(l1), int(l2), int(ms)]
    except (TypeError, ValueError, LayoutRetouchError):
        return [gr.update()] * 3
    names = SCHEDULE_KNOBS[:3]
    if scale:
        bounds = {n: FIELD_BY_NAME[n].slider_range() for n in names}
        new = unscaled_values(run, *values)
    else:
        bounds = knob_bounds(run, plan)
        new = effective_values(run, *values)
    out = []
    for name, value in zip(names, new):
        lo, hi = (int(b) for b in bounds[name])
        hi = max(hi, lo + 1)  # a slider needs a range (λ1 = 0 only: the line says why)
        update = {"minimum": lo, "maximum": hi}
        if values_too:
            update["value"] = min(max(value, lo), hi)
        out.append(gr.update(**update))
    return out


def steps_run(steps: int, strength=None, source=None) -> tuple[int, str]:
    """(the steps both stages are scheduled over, where they come from): txt2img's steps; img2img's
    steps actually run (steps × denoising strength); with layout source 'input' all the steps."""
    if strength is None or source == "input":
        return steps, ""
    run = img2img_steps(steps, float(strength), bool(opt("img2img_fix_steps", False)))
    return run, f" (img2img runs {run} of {steps} at denoising strength {float(strength):g})"


def stage1_plan(sampler, steps: int, strength=None, source=None):
    """What stage 1's sampler runs (λ1 counts its steps); None without stage 1 or sampler."""
    if not sampler or source == "input":
        return None
    return samplers.planned(str(sampler), steps, None if strength is None else float(strength))


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
    `sampler`: what the host's sampler really runs in stage 1 (DDIM at 10 steps runs 9): λ1 counts
    those steps, and the line says so ("λ1=1 of DDIM's 9 steps"). A value out of range: the same
    message as Generate would give."""
    try:
        params = LayoutRetouchParams(lambda1=l1, lambda2=l2, mask_start=ms, scale_with_steps=scale)
        steps = int(steps)
        if strength is not None and source == "input":
            return (
                f"At {steps} steps (the input image retouched over all of them; no stage 1, "
                f"denoising strength not used): {params.schedule(steps).describe(stage1=False)}"
            )
        run, where = steps_run(steps, strength, source)
        plan = stage1_plan(sampler, steps, strength, source)
        schedule = params.schedule(run, sampler=plan)
        words = plan.words() if plan is not None and schedule.lambda1 else ""
        return f"At {run} steps{where}: {schedule.describe()}" + (
            f"; stage 1: {words}" if words else ""
        )
    except LayoutRetouchError as e:
        return f"⚠ {ui_text.for_ui(e.message)}"


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
