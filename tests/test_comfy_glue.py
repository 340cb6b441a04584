"""The ComfyUI glue without ComfyUI: the node inputs derived from params.FIELDS, the error naming,
stage 1's split at λ1 (what each sampler pass gets, and that the second continues the first exactly)
and the tensor conversions — over stand-ins for the ComfyUI calls (`run` takes them handed in)."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from layout_retouch_comfy import inputs, run, tensors
from layout_retouch_comfy import subjects as S
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS, LayoutRetouchParams
from lib_layout_retouch.progress import ProgressPlan


def test_every_field_is_an_input_a_socket_or_named_as_not_offered():
    offered = set(inputs.ADVANCED) | set(inputs.CONCEPT) | set(inputs.LAMBDAS)
    for f in FIELDS:
        assert (f.name in offered) + (f.name in inputs.SOCKETS) + (
            f.name in inputs.NOT_OFFERED
        ) == 1, f.name


@pytest.mark.parametrize("name", inputs.ADVANCED + inputs.LAMBDAS + inputs.CONCEPT)
def test_inputs_keep_the_fields_default_range_and_hint(name):
    f = FIELD_BY_NAME[name]
    kind, opts = inputs.field_input(name)
    assert opts["default"] == f.default and opts["tooltip"] == inputs.HINTS.get(name, f.hint)
    if f.kind == "choice":  # ComfyUI offers all of them, or the ones it can serve (the default too)
        assert kind == list(inputs.CHOICES.get(name, f.choices)) and f.default in kind
        assert set(kind) <= set(f.choices)
    if f.kind == "int":
        assert kind == "INT" and opts["min"] == f.minimum
    if f.kind == "float":
        assert kind == "FLOAT" and (opts["min"], opts["max"]) == f.slider_range()
        f.check_range(opts["min"]) and f.check_range(opts["max"])  # the widget's ends are valid


def test_make_params_vanilla_socket_decides_the_personalization():
    def own(vanilla):
        subject = S.Subject(None, inputs.own_personalization(vanilla), "sks", "dog")
        return inputs.make_params({"lambda1": 3}, [subject.params([])], vanilla=vanilla)

    p = own(True)
    assert p.personalization == "dreambooth" and p.lambda1 == 3 and p.enabled
    assert (p.concept_token, p.class_phrase, p.subjects) == ("sks", "dog", ())
    p = own(False)
    assert p.personalization == "textual_inversion"
    with pytest.raises(LayoutRetouchError) as e:
        p.validate()
    assert inputs.node_error(e.value).parameter == "reference"
    # the message speaks of the node's input, not the WebUI parameter's name
    assert str(inputs.node_error(e.value)) == (
        "Layout-and-Retouch: no reference: upload one photo of your subject [input 'reference']"
    )


def test_subject_1_is_the_nodes_own_or_the_chains_first():
    dog = S.Subject("dog photos", "lora", "sks", "dog", "dog.safetensors", {"w": 1}, 0.8)
    cat = S.Subject("cat photos", "photo", "", "cat")
    own = S.Subject("own photos", "dreambooth", "qwe", "bird")
    assert S.run_subjects(own, (dog, cat)) == [own, dog, cat]
    assert S.run_subjects(None, (dog, cat)) == [dog, cat]
    with pytest.raises(LayoutRetouchError, match="no subject") as e:
        S.run_subjects(None, None)
    assert e.value.parameter == "reference"
    d, c = Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")
    p = inputs.make_params({}, [dog.params([d]), cat.params([c])], vanilla=False)
    assert (p.concept_token, p.class_phrase, p.personalization) == ("sks", "dog", "lora")
    assert [s.class_phrase for s in p.all_subjects()] == ["dog", "cat"]
    assert p.subjects[0].photo_only and p.subjects[0].references == [c]
    p.validate()


@pytest.mark.parametrize(
    "personalization, token, lora, words",
    [
        ("lora", "sks", S.NO_LORA, "needs the subject's LoRA"),
        ("dreambooth", "sks", "dog.safetensors", "choose personalization 'lora'"),
        ("textual_inversion", " ", S.NO_LORA, "needs the concept token"),
    ],
)
def test_a_subject_node_refuses_what_its_inputs_contradict(personalization, token, lora, words):
    with pytest.raises(LayoutRetouchError, match=words):
        S.check_subject(personalization, token, lora)
    S.check_subject("photo", "", S.NO_LORA)  # no trained model: no token, no LoRA
    S.check_subject("lora", "sks", "dog.safetensors")


def test_the_layout_nodes_prompt_replaces_every_chained_subjects_token():
    cat = S.Subject(None, "lora", "zwx", "cat", "cat.safetensors", {}, 1.0)
    bird = S.Subject(None, "photo", "", "bird")
    prompt = "a sks dog and zwx cat and a bird"
    job = run.layout_job(prompt, "", "sks", "dog", steps=4, lambda1=1, subjects=(cat, bird))
    assert job.prompts.layout == "a dog and cat and a bird"
    # the node's own words are a Subject node's: not twice
    dog = S.Subject(None, "lora", "sks", "dog", "dog.safetensors", {}, 1.0)
    again = run.layout_job(prompt, "", "sks", "dog", steps=4, lambda1=1, subjects=(dog, cat))
    assert again.prompts.layout == "a dog and cat and a bird"
    assert run.layout_job("a sks dog", "", "sks", "dog", steps=4, lambda1=1).prompts.layout == (
        "a dog"
    )


def test_a_chain_holds_at_most_max_subjects():
    one = S.Subject(None, "photo", "", "dog")
    chain = S.chained(S.chained(None, one), one)
    assert len(S.chained(chain, one)) == 3
    with pytest.raises(LayoutRetouchError, match="4 subjects are chained; at most 3") as e:
        S.chained(S.chained(chain, one), one)
    assert e.value.parameter == "subjects"


def test_node_error_keeps_a_message_that_names_the_input_already():
    e = LayoutRetouchError("connect an SD1.x model to 'vanilla_model'", parameter="vanilla_model")
    assert str(inputs.node_error(e)) == str(e)


class Base:
    scale = 0.5

    def process_latent_in(self, x):
        return x * self.scale

    def process_latent_out(self, x):
        return x / self.scale


class Calls:
    """ComfyUI's calls as `run` makes them: each sampler pass is recorded; the sampler returns
    latent + σ_last·noise in the model's scale (what a sampler that stops at σ_last gives)."""

    SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.0])

    def __init__(self):
        self.passes = []

    def fix_empty_latent_channels(self, model, samples):
        return samples

    def prepare_noise(self, samples, seed, batch_index=None):
        return torch.randn(samples.shape, generator=torch.Generator().manual_seed(seed))

    def encode(self, clip, text):
        return [(clip, text)]

    def sigmas(self, model, steps, sampler_name, scheduler, denoise):
        return self.SIGMAS

    def sample(
        self, model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw
    ):
        self.passes.append(
            dict(
                model=model, positive=positive, negative=negative, noise=noise, latent=latent, **kw
            )
        )
        last = kw.get("last_step", steps)
        sigma = 0.0 if kw.get("force_full_denoise") else float(self.SIGMAS[last])
        b = model.model
        start = b.process_latent_in(latent) + float(self.SIGMAS[kw.get("start_step") or 0]) * noise
        return b.process_latent_out(start * 0.9 + sigma * 0.0 + 0.01 * (last or 0))


def test_stage1_splits_at_lambda1_and_the_second_pass_continues_the_first():
    calls = Calls()
    personalized = SimpleNamespace(model=Base(), name="personalized")
    vanilla = SimpleNamespace(model=Base(), name="vanilla")
    job = run.layout_job(
        "a sks dog", "blurry", "sks", "dog", steps=4, lambda1=2, scale_with_steps=False
    )
    latent = {"samples": torch.zeros(1, 4, 2, 2)}
    progress = run.Progress(SimpleNamespace(update_absolute=lambda *a: None), 4)
    run.stage1(
        calls,
        job,
        model=personalized,
        vanilla_model=vanilla,
        clip="clip",
        vanilla_clip="vclip",
        latent=latent,
        seed=3,
        steps=4,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        noise_mask=None,
        progress=progress,
    )
    first, second = calls.passes
    assert first["model"] is vanilla and first["positive"] == [("vclip", "a dog")]
    assert first["negative"] == [("vclip", "blurry")]
    assert (first["start_step"], first["last_step"], first["force_full_denoise"]) == (0, 2, False)
    assert second["model"] is personalized and second["positive"] == [("clip", "a sks dog")]
    assert (second["start_step"], second["last_step"], second["force_full_denoise"]) == (2, 4, True)
    # the second pass starts where the first stopped: latent + σ_λ1·noise2 = the first's output
    x1 = Calls().sample(
        vanilla,
        first["noise"],
        4,
        7.0,
        "euler",
        "normal",
        None,
        None,
        latent["samples"],
        start_step=0,
        last_step=2,
        force_full_denoise=False,
    )
    b = personalized.model
    start = b.process_latent_in(second["latent"]) + float(Calls.SIGMAS[2]) * second["noise"]
    assert torch.allclose(start, b.process_latent_in(x1), atol=1e-6)


def test_stage1_without_vanilla_steps_is_one_pass():
    calls = Calls()
    personalized = SimpleNamespace(model=Base())
    job = run.layout_job("a sks dog", "", "sks", "dog", steps=4, lambda1=0, scale_with_steps=False)
    scaled = run.layout_job("a sks dog", "", "sks", "dog", steps=4, lambda1=5).schedule
    assert scaled.lambda1 == LayoutRetouchParams(lambda1=5).schedule(4).lambda1
    progress = run.Progress(SimpleNamespace(update_absolute=lambda *a: None), 4)
    run.stage1(
        calls,
        job,
        model=personalized,
        vanilla_model=None,
        clip="clip",
        vanilla_clip=None,
        latent={"samples": torch.zeros(1, 4, 2, 2)},
        seed=3,
        steps=4,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        noise_mask=None,
        progress=progress,
    )
    (only,) = calls.passes
    assert only["model"] is personalized and "start_step" not in only

    with pytest.raises(LayoutRetouchError, match="does not appear"):
        run.layout_job("a dog", "", "sks", "dog", steps=4, lambda1=1)
    with pytest.raises(LayoutRetouchError, match="λ1"):
        run.layout_job("a sks dog", "", "sks", "dog", steps=4, lambda1=4, scale_with_steps=False)


def test_stage1_progress_counts_both_passes_forward():
    calls, seen = Calls(), []
    personalized = SimpleNamespace(model=Base())
    job = run.layout_job("a sks dog", "", "sks", "dog", steps=4, lambda1=1, scale_with_steps=False)
    progress = run.Progress(SimpleNamespace(update_absolute=lambda v, t, *a: seen.append(v)), 4)
    run.stage1(
        calls,
        job,
        model=personalized,
        vanilla_model=None,
        clip="c",
        vanilla_clip=None,
        latent={"samples": torch.zeros(1, 4, 2, 2)},
        seed=3,
        steps=4,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        noise_mask=None,
        progress=progress,
    )
    first, second = calls.passes
    first["callback"](0, None, None, 1)  # ComfyUI: (step, x0, x, steps of this pass)
    for step in range(3):
        second["callback"](step, None, None, 3)
    assert seen == [run.TICKS * s for s in (1, 2, 3, 4)]


def test_progress_weights_the_phases_as_the_progress_plan():
    """The bar counts stage 1's steps, then each stage-2 phase by its plan's weight (a retouch step
    runs more rows than an inversion step); it never goes back, also when the plan shrinks."""
    seen = []
    plan = ProgressPlan(steps=4, batch=1, references=2)
    p = run.Progress(SimpleNamespace(update_absolute=lambda v, t, *a: seen.append((v, t))), 4, plan)
    p.sampler_callback(0)(3, None, None, 4)
    assert seen[-1] == (4 * run.TICKS, round(plan.total * run.TICKS))
    p("reference inversion", 4, 8)  # half of both photos' inversions
    want = 4 + plan.units["reference inversion"] / 2
    assert seen[-1][0] == round(want * run.TICKS)
    cached = ProgressPlan(steps=4, batch=1, references=2, references_to_invert=0)
    p.replan(cached)
    p("layout inversion", 1, 4)  # before the old position in the new plan: stays
    assert seen[-1][0] == round(want * run.TICKS) and seen[-1][1] == round(cached.total * run.TICKS)
    p("retouch", 1, 4)
    retouch_step = cached.units["retouch"] / 4
    assert retouch_step > 4 * cached.units["layout inversion"] / 4  # weighted, not step-counted
    assert seen[-1][0] == round(cached.position("retouch", 1, 4) * run.TICKS)
    p("retouch", 4, 4)
    assert seen[-1] == (round(cached.total * run.TICKS),) * 2


def test_reference_batch_becomes_photos_and_masks_go_to_latent_size():
    image = torch.rand(2, 16, 16, 3)
    photos = tensors.reference_photos(image)
    assert len(photos) == 2 and photos[0].size == (16, 16)
    with pytest.raises(LayoutRetouchError, match="at most 4"):
        tensors.reference_photos(torch.rand(5, 8, 8, 3))
    mask = torch.zeros(16, 16)
    mask[:, 8:] = 1
    m = tensors.mask_at(mask, 2, (2, 2))
    assert m.shape == (1, 1, 2, 2) and torch.equal(m[0, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(LayoutRetouchError, match="mask"):
        tensors.mask_at(torch.zeros(3, 16, 16), 2, (2, 2))
    out = tensors.maps_to_mask(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), 1, (4, 4))
    assert (
        out.shape == (1, 4, 4)
        and out[0, 0, 3] == 1
        and tensors.mask_to_image(out).shape == (1, 4, 4, 3)
    )


def test_info_text_says_the_values_used_the_mask_and_the_notes():
    from layout_retouch_comfy import texts
    from lib_layout_retouch.schedule import Schedule

    scaled = Schedule.for_steps(4)  # the paper's 5 / 10 / 31 for 50 steps
    assert texts.info_text(
        scaled, mask_kind="SAM+CA", notes=["reference was 780×780: resized"]
    ) == (
        "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4 (scaled from 5 / 10 / 31 for 50 steps)\n"
        "Mask: SAM+CA\nNotes: reference was 780×780: resized"
    )
    as_given = Schedule.for_steps(8, 2, 3, 9, scale=False)
    assert texts.info_text(as_given) == "At 8 steps: λ1=2, λ2=3, no mask blending in 8 steps"
    # no stage 1 (a layout from elsewhere): no λ1; a layout alone: λ1 only
    assert texts.info_text(scaled, stage1=False).startswith(
        "At 4 steps: λ2=1, mask from step 3 of 4 (scaled from 10 / 31 for 50 steps)"
    )
    assert texts.info_text(scaled, retouch=False) == "At 4 steps: λ1=1 (scaled from 5 for 50 steps)"
    # at the paper's own step count there is nothing to scale
    assert "scaled" not in texts.info_text(Schedule.for_steps(50))


def test_check_before_run_skips_what_another_node_feeds():
    lambdas = dict(lambda1=None, lambda2=10, mask_start=31)
    # λ1 is fed by another node: the ranges are checked, the step-count rules wait for the run
    assert inputs.check_before_run(steps=4, lambdas=lambdas, scale_with_steps=False) is None
    message = inputs.check_before_run(steps=None, lambdas=dict(lambda2=-1))
    assert "'lambda2'" in message
    # the prompt is fed: the concept words are still checked, their place in the prompt is not
    assert inputs.check_before_run(concept_token="sks", class_phrase="dog", lambdas={}) is None
    message = inputs.check_before_run(concept_token="", class_phrase=None, lambdas={})
    assert "concept_token is empty" in message


def test_the_retouch_mask_is_the_inpaint_mask_times_the_subject_mask():
    assert tensors.retouch_mask(None, None, 1, (2, 2)) is None
    inpaint = torch.zeros(16, 16)
    inpaint[:, :8] = 1  # left half
    subject = torch.zeros(16, 16)
    subject[:8] = 1  # top half
    both = tensors.retouch_mask(inpaint, subject, 2, (2, 2))
    assert both.shape == (1, 1, 2, 2) and both[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    alone = tensors.retouch_mask(None, subject, 2, (2, 2))
    assert alone[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
