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
from lib_layout_retouch import panel_subjects as ps
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.images import find_fingerprints
from lib_layout_retouch.job import SUBJECT_COLOURS
from lib_layout_retouch.params import (
    FIELD_BY_NAME,
    FIELDS,
    MAX_SUBJECTS,
    NO_SAM,
    LayoutRetouchParams,
)
from lib_layout_retouch.prompts import guess_subjects
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
    if f.kind == "subjects":  # subjects 2 …: the shown subject panels' values (`SubjectPanel`)
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
        panel.subject1_heading = gr.HTML(
            subject_heading(1), visible=False, elem_id=script.elem_id("subject1_heading")
        )
        build_subject_row(panel)
        build_more_subjects(panel)
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


# --- subjects 2 … ---------------------------------------------------------------------------------
def subject_heading(number: int) -> str:
    """ "Subject N" with the colour its region has in the intermediates' regions picture."""
    r, g, b = SUBJECT_COLOURS[(number - 1) % len(SUBJECT_COLOURS)]
    return (
        f'<span class="layout-retouch-subject-heading"><span class="layout-retouch-swatch" '
        f'style="background: rgb({r}, {g}, {b})"></span>{ui_text.subject_heading(number)}</span>'
    )


class SubjectPanel:
    """The controls of subject `number` (2 …), shown by *Add subject*: photo and more photos, how
    it was learned, concept token, class phrase, LoRA name; a notice (paste) and a message (a
    photo that cannot be read)."""

    def __init__(self, panel: Panel, number: int):
        from modules.ui_components import FormRow

        self.number = number
        eid = lambda name: panel.script.elem_id(f"subject{number}_{name}")  # noqa: E731
        labels = panel.labels["personalization"]
        with gr.Column(visible=False, elem_id=eid("panel"), variant="panel") as self.box:
            with gr.Row():
                gr.HTML(subject_heading(number), elem_id=eid("heading"))
                self.remove = gr.Button(
                    ui_text.REMOVE_SUBJECT_LABEL, elem_id=eid("remove"), size="sm", scale=0
                )
            self.notice = gr.Markdown("", visible=False, elem_id=eid("photo_notice"))
            with gr.Row():
                with gr.Column(scale=1, min_width=200):
                    self.photo = image_input(
                        FIELD_BY_NAME["reference_image"].label, eid("reference_image")
                    )
                    self.more = gr.File(
                        label=ui_text.MORE_PHOTOS_LABEL,
                        file_count="multiple",
                        file_types=["image"],
                        elem_id=eid("more_photos"),
                    )
                with gr.Column(scale=2):
                    self.kind = gr.Radio(
                        choices=list(labels.values()),
                        value=labels[ps.DEFAULT_KIND],
                        label=FIELD_BY_NAME["personalization"].label,
                        elem_id=eid("personalization"),
                    )
                    with FormRow():
                        self.token = text_box(FIELD_BY_NAME["concept_token"].label, eid("token"))
                        self.cls = text_box(FIELD_BY_NAME["class_phrase"].label, eid("class"))
                        self.lora = text_box(
                            ui_text.LORA_NAME_LABEL, eid("lora"), ps.DEFAULT_KIND == "lora"
                        )
                    self.message = gr.Markdown("", visible=False, elem_id=eid("message"))

    @property
    def values(self) -> list:
        """The controls whose values make the subject, in `read_row`'s order."""
        return [getattr(self, name) for name in SUBJECT_CONTROLS]


# A subject panel's controls that make the subject (`read_row`'s arguments, in order).
SUBJECT_CONTROLS = ("photo", "more", "kind", "token", "cls", "lora")


def text_box(label: str, elem_id: str, visible: bool = True):
    return gr.Textbox(value="", label=label, elem_id=elem_id, lines=1, max_lines=1, visible=visible)


def build_more_subjects(panel: Panel) -> None:
    """Subjects 2 … MAX_SUBJECTS (hidden until *Add subject*), the hidden count of the subjects
    shown, and the `subjects` argument they make (a state, `FIELDS`' last)."""
    eid = panel.script.elem_id
    panel.subject_count = gr.Number(
        value=1, precision=0, visible=False, elem_id=eid("subject_count")
    )
    panel.more_subjects = [SubjectPanel(panel, n) for n in range(2, MAX_SUBJECTS + 1)]
    panel.add_subject = gr.Button(
        ui_text.ADD_SUBJECT_LABEL, elem_id=eid("add_subject"), size="sm", variant="secondary"
    )
    panel.make("subjects")


def read_row(photo, more, kind, token, cls, lora) -> tuple[ps.SubjectRow, str]:
    """One subject panel's values → (its row, "" or why a photo could not be read)."""
    photos, problem = [], ""
    try:
        params = LayoutRetouchParams(reference_image=photo)
        if more:
            params = api.with_more_photos(types.SimpleNamespace(is_api=False), params, more)
        photos = params.references
    except LayoutRetouchError as e:
        problem = ui_text.for_ui(e.message)
    return ps.SubjectRow(photos, kind, token or "", cls or "", lora or ""), problem


def subjects_state(count, *values):
    """The `subjects` argument from the shown panels, and each panel's photo message."""
    per = len(SUBJECT_CONTROLS)
    rows, messages = [], []
    for k in range(len(values) // per):
        row, problem = read_row(*values[k * per : (k + 1) * per])
        rows.append(row)
        text = f"⚠ {ui_text.subject_heading(k + 2)}: {problem}" if problem else ""
        messages.append(gr.update(value=text, visible=bool(problem)))
    return [ps.subjects_value(count, rows)] + messages


def shown_subjects(count):
    """Visibility of the subject panels, subject 1's heading and *Add subject* for `count`."""
    n = ps.shown_count(count)
    boxes = [gr.update(visible=k < n) for k in range(1, MAX_SUBJECTS)]
    return boxes + [gr.update(visible=n > 1), gr.update(visible=n < MAX_SUBJECTS)]


def remove_subject(index: int, count, *values):
    """✖ on subject `index` + 2: the subjects after it move up, one panel fewer is shown."""
    per = len(SUBJECT_CONTROLS)
    rows = [list(values[k * per : (k + 1) * per]) for k in range(len(values) // per)]
    empty = [None, None, ps.KIND_LABELS[ps.DEFAULT_KIND], "", "", ""]
    rows = rows[:index] + rows[index + 1 :] + [empty]
    out = []
    for photo, more, kind, token, cls, lora in rows:
        files = [api._upload_path(m) for m in (more or [])] or None
        out += [photo, files, kind, token, cls, lora]
    return out + [max(ps.shown_count(count) - 1, 1)]


def wire_subjects(panel: Panel) -> None:
    count, subjects = panel.subject_count, panel.more_subjects
    values = [c for s in subjects for c in s.values]
    panel.add_subject.click(
        lambda n: min(ps.shown_count(n) + 1, MAX_SUBJECTS),
        inputs=[count],
        outputs=[count],
        show_progress=False,
    )
    count.change(
        shown_subjects,
        inputs=[count],
        outputs=[s.box for s in subjects] + [panel.subject1_heading, panel.add_subject],
        show_progress=False,
    )
    for c in [count] + values:
        c.change(
            subjects_state,
            inputs=[count] + values,
            outputs=[panel.comps["subjects"]] + [s.message for s in subjects],
            show_progress=False,
        )
    lora_label = panel.labels["personalization"]["lora"]
    for k, s in enumerate(subjects):
        s.remove.click(
            lambda n, *v, k=k: remove_subject(k, n, *v),
            inputs=[count] + values,
            outputs=values + [count],
            show_progress=False,
        )
        s.kind.change(
            lambda v: gr.update(visible=v == lora_label),
            inputs=[s.kind],
            outputs=[s.lora],
            show_progress=False,
        )
        for photo in (s.photo, s.more):
            photo.upload(
                lambda: gr.update(value="", visible=False), outputs=[s.notice], show_progress=False
            )
        s.notice.change(
            lambda notice, photo, more, number=s.number: photos_loaded_notice(
                notice, photo, more, number
            ),
            inputs=[s.notice, s.photo, s.more],
            outputs=[s.notice],
            show_progress=False,
        )


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
    # the vanilla checkpoint (one for all subjects) is asked for while a shown subject is DreamBooth
    kinds = [comps["personalization"]] + [s.kind for s in panel.more_subjects]
    dreambooth = labels["personalization"]["dreambooth"]

    def vanilla_shown(count, *shown_kinds):
        wanted = dreambooth in shown_kinds[: ps.shown_count(count)]
        return gr.update(visible=wanted), gr.update() if wanted else gr.update(visible=False)

    for c in [panel.subject_count] + kinds:
        c.change(
            vanilla_shown,
            inputs=[panel.subject_count] + kinds,
            outputs=[panel.vanilla_row, panel.vanilla_notice],
            show_progress=False,
        )
    wire_subjects(panel)
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
        texts = [comps["concept_token"], comps["class_phrase"]]
        texts += [c for s in panel.more_subjects for c in (s.token, s.cls)]
        panel.guess.click(
            guess_concept_ui,
            inputs=[prompt_box, panel.subject_count],
            outputs=texts + [panel.subject_count, panel.guess_msg],
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
def photos_loaded_notice(notice, photo, more, subject: int = 1):
    """The "upload the photos again" notice of a paste, replaced by a calm one when every photo used
    (the fingerprints it names) is the one loaded in the panel of subject `subject`."""
    used = find_fingerprints(notice or "")
    if not used or not str(notice).startswith("⚠"):
        return gr.update()
    loaded = set(loaded_fingerprints(photo, more))
    if not set(used) <= loaded:
        return gr.update()
    return gr.update(value=ui_text.photos_still_loaded(used, subject), visible=True)


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
    script.infotext_fields += subject_paste_fields(panel)
    script.paste_field_names = [f.infotext_key for f in FIELDS if f.infotext_key]
    script.paste_field_names += ps.paste_keys()


def pasted(d) -> list | None:
    """Subjects 2 … of pasted parameters (`PastedSubject`s), or None without `LR ` keys."""
    if not has_lr_keys(d):
        return None
    return ps.pasted_subjects(LayoutRetouchParams.from_infotext(d))


def subject_paste_fields(panel: Panel) -> list:
    """The paste of subjects 2 …: how many are shown, and each one's texts (a subject the pasted
    image did not have is emptied) and photo notice (no image stores the photos)."""
    fields = [(panel.subject_count, lambda d: None if pasted(d) is None else 1 + len(pasted(d)))]
    empty = ps.PastedSubject(ps.KIND_LABELS[ps.DEFAULT_KIND], "", "", "", [])
    for k, s in enumerate(panel.more_subjects):

        def reader(attr, k=k):
            def read(d):
                subjects = pasted(d)
                if subjects is None:
                    return None
                return getattr(subjects[k] if k < len(subjects) else empty, attr)

            return read

        def notice(d, k=k, number=s.number):
            subjects = pasted(d)
            if subjects is None:
                return None
            if k >= len(subjects):
                return gr.update(value="", visible=False)
            prints = ", ".join(subjects[k].fingerprints)
            return gr.update(value=ui_text.photo_notice(prints, number), visible=True)

        fields += [
            (s.kind, reader("personalization")),
            (s.token, reader("concept_token")),
            (s.cls, reader("class_phrase")),
            (s.lora, reader("lora")),
            (s.notice, notice),
        ]
    return fields


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


def guess_concept_ui(prompt, count=1):
    """Guess: the concept token and class phrase of every subject the prompt names (subject 1's
    fields, then subject 2's … whose panels open), the panels shown, and what it found."""
    names = hosts.current().embedding_names() or []
    found = guess_subjects(prompt or "", names, MAX_SUBJECTS)
    message = ui_text.guess_message(prompt, found, names)
    texts = [gr.update()] * (2 * MAX_SUBJECTS)
    for k, (token, cls) in enumerate(found):
        texts[2 * k : 2 * k + 2] = [token, cls or gr.update()]
    return texts + [ps.guessed_count(count, found), message]


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
