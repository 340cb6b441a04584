"""Several subjects in one image (docs/ALGORITHM.md, "Several subjects"): the prompts and rows of K
subjects, disjoint regions, region-k queries attending to reference k only, each subject's map from
its own tokens, LoRA-like weights acting in their own region, one subject unchanged, refusals."""

import contextlib

import pytest
import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.errors import Interrupted, LayoutRetouchError
from lib_layout_retouch.job import RetouchJob
from lib_layout_retouch.masks import NO_REGION, LayerRegions, regions_from_maps, regions_from_scores
from lib_layout_retouch.params import LayoutRetouchParams, SubjectParams
from lib_layout_retouch.prompts import SubjectWords, derive_prompts
from lib_layout_retouch.retouch.editor import (
    COND,
    LAYOUT,
    REFERENCE,
    TARGET,
    RowPlan,
    StepResults,
    StepState,
)
from lib_layout_retouch.retouch.layers import LayerTable
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.subjects import MAX_SUBJECTS, derive_subject_prompts, subject_rows
from lib_layout_retouch.unet.attention import RetouchAttention
from lib_layout_retouch.unet.model import LdmModel
from tests.paths import DOG_PHOTO, VICO, photo_tensor
from tests.tolerance import (
    assert_differs_beyond,
    assert_rounding_close,
    attention_roundings,
    network_roundings,
)

DOG_CAT = "a sks dog and a cat on the beach"
WORDS = [SubjectWords("sks", "dog"), SubjectWords("", "cat")]
CAT_PHOTO = VICO / "black_cat" / "00.jpg"


# -- prompts and rows ---------------------------------------------------------------------------------
def test_prompts_of_two_subjects():
    p = derive_subject_prompts(
        "a photo of sks dog and zwx cat on a sofa",
        [SubjectWords("sks", "dog"), SubjectWords("zwx", "cat")],
    )
    assert p.layout == "a photo of dog and cat on a sofa"
    assert p.reference == "a photo of sks dog and zwx cat"  # the target's y_r names both
    assert [p.reference_of_subject(k) for k in (0, 1)] == [
        "a photo of sks dog",
        "a photo of zwx cat",
    ]
    photo_only = derive_subject_prompts(DOG_CAT, WORDS)
    assert photo_only.layout == "a dog and a cat on the beach"
    assert photo_only.reference_of_subject(1) == "a photo of cat"


def test_one_subject_is_the_papers_prompts():
    assert derive_subject_prompts("a sks dog", [SubjectWords("sks", "dog")]) == derive_prompts(
        "a sks dog", "sks", "dog"
    )


@pytest.mark.parametrize(
    "prompt, words, message",
    [
        (
            "a sks dog and a cat",
            [SubjectWords("sks", "dog"), SubjectWords("zwx", "cat")],
            "subject 2: the concept token 'zwx' does not appear in the prompt",
        ),
        (
            "a sks dog and sks cat",
            [SubjectWords("sks", "dog"), SubjectWords("sks", "cat")],
            "subject 2: the concept token 'sks' is subject 1's too",
        ),
        (
            "a sks dog and a bird",
            [SubjectWords("sks", "dog"), SubjectWords("", "cat")],
            "subject 2: the class phrase 'cat' does not appear in the prompt",
        ),
        ("a dog", [SubjectWords("", "dog")] * (MAX_SUBJECTS + 1), "at most 3 are supported"),
    ],
)
def test_prompt_refusals_name_the_subject(prompt, words, message):
    with pytest.raises(LayoutRetouchError) as e:
        derive_subject_prompts(prompt, words)
    assert message in str(e.value)


def test_subjects_that_share_a_token_are_refused_with_how_to_tell_them_apart():
    def rows_of(prompt, phrases):  # whitespace tokens, BOS at row 0
        ids = prompt.split()
        return sorted(1 + i for i, w in enumerate(ids) if w in phrases)

    words = [SubjectWords("sks", "dog"), SubjectWords("zwx", "dog")]
    with pytest.raises(LayoutRetouchError) as e:
        subject_rows(rows_of, "a sks dog and zwx dog", words)
    assert "share tokens" in str(e.value) and "'terrier' and 'poodle'" in str(e.value)
    assert subject_rows(rows_of, DOG_CAT, WORDS) == [[2, 3], [6]]


# -- regions -------------------------------------------------------------------------------------------
def test_regions_are_disjoint_and_go_to_the_higher_score():
    scores = torch.zeros(2, 1, 2, 3)
    scores[0, 0] = torch.tensor([[0.9, 0.5, 0.0], [0.0, 0.0, 0.0]])
    scores[1, 0] = torch.tensor([[0.1, 0.7, 0.3], [0.0, 0.0, 0.0]])
    index = regions_from_scores(scores)
    assert index.tolist() == [[[0, 1, 1], [NO_REGION, NO_REGION, NO_REGION]]]


def test_regions_from_each_subjects_own_map_threshold_as_the_mask():
    left, right = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    left[0, :, :2], right[0, :, 2:] = 1.0, 1.0
    right[0, 0, 0] = 0.05  # below the threshold of the normalised map
    index = regions_from_maps([left, right], threshold=0.1)
    assert (index[0, :, :2] == 0).all() and (index[0, :, 2:] == 1).all()
    layer = LayerRegions(index, latent_hw=(8, 8)).for_tokens(16)  # a 4×4 layer of an 8×8 latent
    assert layer.shape == (1, 16) and layer.reshape(4, 4).tolist() == index[0].tolist()
    assert LayerRegions(index, (8, 8)).for_tokens(64).reshape(8, 8)[:, :4].eq(0).all()


def test_each_subjects_map_comes_from_its_own_tokens():
    probs = torch.rand(2, 2, 16, 6, generator=torch.Generator().manual_seed(0))
    both = StepResults([[1, 2], [4]], latent_hw=(4, 4))
    both.record_maps(probs)
    for group in ([1, 2], [4]):
        alone = StepResults(group, latent_hw=(4, 4))
        alone.record_maps(probs)
        assert torch.equal(
            both.subject_maps_each()[[[1, 2], [4]].index(group)], alone.subject_maps()
        )


# -- the attention: region k attends to reference k only ------------------------------------------------
def _self_attention(tiny_ldm):
    from lib_layout_retouch.unet.layers import attention_modules

    name, module = next(
        (n, m)
        for n, m in attention_modules(tiny_ldm.model.diffusion_model).items()
        if n.endswith("attn1") and m.to_q.in_features == 32
    )
    return name, module


def test_region_queries_attend_to_their_own_subjects_reference_only(tiny_ldm):
    """In the identity phase a target query in subject k's region sees only subject k's photos:
    changing the other subject's reference changes nothing there (bit for bit: same batch shape),
    and outside every region the target keeps the layout's output."""
    name, module = _self_attention(tiny_ldm)
    table = LayerTable(
        "t", reference_layers=(name,), mask_layers=(), blend_layers=(), layout_layers=()
    )
    index = torch.full((1, 8, 8), NO_REGION)
    index[0, :, :3], index[0, :, 5:] = 0, 1  # columns 3–4: no subject
    regions = LayerRegions(index, (8, 8))
    g = torch.Generator().manual_seed(3)
    x_ref0, x_ref1, x_lay, x_t = (torch.randn(1, 64, 32, generator=g) for _ in range(4))
    plan = RowPlan.build([(REFERENCE, 2), (LAYOUT, 1), (TARGET, 1)], halves=(COND,))

    def run(ref1):
        editor = RetouchAttention(table, [[1], [2]], latent_hw=(8, 8), n_references=2)
        editor.begin_step(
            StepState(plan, paint_identity=True, regions=regions, reference_groups=(1, 1))
        )
        with torch.no_grad():
            return editor(name, module, torch.cat([x_ref0, ref1, x_lay, x_t]), None, None, None)

    a, b = run(x_ref1), run(torch.randn(1, 64, 32, generator=g))
    cells = index[0].reshape(-1)
    region0, region1, outside = cells == 0, cells == 1, cells == NO_REGION
    assert torch.equal(a[3, region0], b[3, region0])  # reference 1 does not reach region 0
    assert not torch.allclose(a[3, region1], b[3, region1], atol=1e-4)  # it does reach region 1
    with torch.no_grad():  # the layout row's own attention output (no edit), and the target's
        layout_own, target_own = module(x_lay), module(x_t)
    # one row alone against the same row in the batch of four: equal up to the attention's rounding
    tol = assert_rounding_close(
        a[3, outside], layout_own[0, outside], attention_roundings(module, 64)
    )
    assert_differs_beyond(target_own[0, outside], layout_own[0, outside], tol)


# -- the retouch ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two(tiny_ldm):
    model = LdmModel(tiny_ldm)
    prompts = derive_subject_prompts(DOG_CAT, WORDS)
    rows = subject_rows(
        lambda p, ph: model.family.subject_tokens(model, p, ph), DOG_CAT, prompts.subject_words()
    )
    conds = pl.encode_prompts(model, prompts, "", reference_subjects=[0, 1])
    refs = torch.cat([model.encode(photo_tensor()), model.encode(photo_tensor(CAT_PHOTO))])
    layouts = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return model, rows, conds, refs, layouts


def _run(two, **kw):
    model, rows, conds, refs, layouts = two
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(8, lambda1=2, lambda2=2, mask_start=5, scale=False),
        subject_labels=("sks dog", "cat"),
        guidance_scale=kw.pop("guidance_scale", 7.5),
    )
    return pl.retouch(
        model,
        reference_latent=refs,
        layout_latents=layouts,
        conds=conds,
        subject_tokens=rows,
        settings=settings,
        reference_keys=[None, None],
        reference_groups=(1, 1),
        **kw,
    )


def test_two_subjects_give_disjoint_regions_and_their_union_as_mask(two):
    res = _run(two)
    assert res.regions.shape == (1, 8, 8) and res.subject_maps.shape[:2] == (2, 1)
    # M is each cell's own subject's mask: zero exactly where no subject is
    assert torch.equal(res.masks[0] > 0, res.regions[0] != NO_REGION)
    assert set(res.regions.unique().tolist()) <= {NO_REGION, 0, 1}


def _lora_like(unet, seed=5, scale=0.5):
    """A LoRA stand-in: a fixed random change of every Linear weight, on inside the context."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    deltas = [scale * m.weight.std() * torch.randn(m.weight.shape, generator=g) for m in layers]

    @contextlib.contextmanager
    def on():
        for m, d in zip(layers, deltas):
            m.weight.data += d
        try:
            yield
        finally:
            for m, d in zip(layers, deltas):
                m.weight.data -= d

    return on


def test_a_subjects_weights_act_in_its_own_region(two):
    """Subject 1's LoRA-like weights through `subject_weights`: their effect on the result outside
    subject 1's region is a small fraction of the effect inside it (only what attention carries
    across), and far below a LoRA on for the whole image (measured on this model: 0.14 of the
    inside effect, 0.02 of the whole-image LoRA's outside effect; bounds 0.25 and 0.1)."""
    model = two[0]
    on = _lora_like(model.unet)
    plain = _run(two)
    scoped = _run(two, subject_weights=[on, None])
    with on():
        everywhere = _run(two)
    inside = scoped.regions[0] == 0
    assert inside.any() and (~inside).any()

    def effect(res):
        d = (res.latents - plain.latents).abs()[0].mean(0)
        return float(d[inside].mean()), float(d[~inside].mean())

    scoped_in, scoped_out = effect(scoped)
    _, everywhere_out = effect(everywhere)
    assert scoped_out <= 0.25 * scoped_in
    assert scoped_out <= 0.1 * everywhere_out
    assert scoped.unet_calls > plain.unet_calls  # one more call per identity step
    for m in model.unet.modules():  # the weights are back
        assert "forward" not in m.__dict__


def test_every_subject_with_weights_of_its_own(two):
    """Both subjects with LoRA-like weights (the base call then runs no reference rows): each
    subject's weights change the result inside its own region."""
    model = two[0]
    first, second = _lora_like(model.unet, seed=5), _lora_like(model.unet, seed=6)
    one = _run(two, subject_weights=[first, None])
    both = _run(two, subject_weights=[first, second])
    assert torch.isfinite(both.latents).all()
    inside = both.regions[0] == 1
    assert inside.any()
    d = (both.latents - one.latents).abs()[0].mean(0)
    assert float(d[inside].mean()) > 0  # subject 2's weights act in its region
    assert not any("forward" in m.__dict__ for m in model.unet.modules())


def test_interrupt_and_error_restore_the_attention(two):
    model = two[0]
    steps = iter(range(100))
    with pytest.raises(Interrupted):
        _run(two, should_stop=lambda: next(steps) == 12)
    assert not any("forward" in m.__dict__ for m in model.unet.modules())


def test_photo_only_subject_runs_without_a_trained_model(tiny_ldm):
    from PIL import Image

    params = LayoutRetouchParams(
        enabled=True,
        reference_image=Image.open(DOG_PHOTO),
        personalization="photo",
        class_phrase="dog",
        lambda1=2,
        lambda2=2,
        mask_start=4,
        scale_with_steps=False,
    )
    job = RetouchJob(
        params, "a dog on the beach", "", steps=6, width=64, height=64, guidance_scale=5
    )
    assert job.prompts.layout == "a dog on the beach" and job.prompts.reference == "a photo of dog"
    model = LdmModel(tiny_ldm)
    layouts = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    res = job.retouch(
        model,
        layouts,
        subject_tokens=job.subject_rows(model),
        model_key="t",
        cache=None,
        kv_cache=None,
    )
    assert res.masks is not None and not torch.equal(res.latents, layouts)


def test_two_subject_job_prepares_each_subjects_photos(tiny_ldm):
    from PIL import Image

    params = LayoutRetouchParams(
        enabled=True,
        reference_image=Image.open(DOG_PHOTO),
        personalization="textual_inversion",
        concept_token="sks",
        class_phrase="dog",
        subjects=(
            SubjectParams(
                [Image.open(CAT_PHOTO), Image.open(CAT_PHOTO).rotate(90)], "photo", "", "cat"
            ),
        ),
        lambda1=2,
        lambda2=2,
        mask_start=4,
        scale_with_steps=False,
    )
    job = RetouchJob(params, DOG_CAT, "", steps=6, width=64, height=64, guidance_scale=5)
    assert job.reference_groups == (1, 2) and job.reference_subjects() == [0, 1, 1]
    model = LdmModel(tiny_ldm)
    rows = job.subject_rows(model)
    assert len(rows) == 2 and not set(rows[0]) & set(rows[1])
    res = job.retouch(
        model,
        torch.randn(1, 4, 8, 8),
        subject_tokens=rows,
        model_key="t",
        cache=None,
        kv_cache=None,
    )
    assert res.regions is not None


def _subject(personalization, token, phrase, photo=True):
    from PIL import Image

    return SubjectParams(
        Image.new("RGB", (8, 8)) if photo else None, personalization, token, phrase
    )


@pytest.mark.parametrize(
    "subjects, message",
    [
        ([("lora", "", "cat")], "subject 2: concept_token is empty"),
        ([("photo", "", "cat", False)], "subject 2: no reference_image"),
        ([("lora", "SKS", "cat")], "subject 2: the concept token 'SKS' is subject 1's"),
        ([("photo", "", "Dog")], "subject 2: the class phrase 'Dog' is subject 1's"),
        ([("photo", "", c) for c in ("a", "b", "c")], "4 subjects given"),
    ],
)
def test_subject_refusals_name_the_subject(subjects, message):
    first = _subject("lora", "sks", "dog")
    params = LayoutRetouchParams(
        enabled=True,
        reference_image=first.reference_image,
        personalization="lora",
        concept_token="sks",
        class_phrase="dog",
        subjects=tuple(_subject(*s) for s in subjects),
    )
    with pytest.raises(LayoutRetouchError) as e:
        params.validate()
    assert message in str(e.value)


def test_the_api_list_of_every_subject():
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    p = LayoutRetouchParams.from_dict(
        {
            "enabled": True,
            "subjects": [
                {
                    "reference_image": img,
                    "personalization": "lora",
                    "concept_token": "sks",
                    "class_phrase": "dog",
                },
                {"reference_image": img, "personalization": "photo", "class_phrase": "cat"},
            ],
        }
    )
    assert (p.concept_token, p.class_phrase, p.personalization) == ("sks", "dog", "lora")
    assert [s.class_phrase for s in p.subjects] == ["cat"]
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({"subjects": [{"class_phrase": "cat", "colour": "red"}]})
    assert "unknown key 'colour'" in str(e.value)
    # subject 1 has no LoRA name of its own: a named one is refused, not dropped
    with pytest.raises(LayoutRetouchError) as e:
        LayoutRetouchParams.from_dict({"subjects": [{"class_phrase": "cat", "lora": "my_cat"}]})
    assert e.value.message.startswith("subject 1: its lora 'my_cat' cannot be named")
    assert e.value.parameter == "subjects"


def test_joint_block_region_queries_attend_to_their_own_subjects_reference_only():
    """The same rule at a DiT's joint block (the token span: [text ; image]): a region-k image
    query attends to [its own text ; reference k's image tokens] only; text tokens are never
    painted."""
    from lib_layout_retouch.dit.joint import SHARED, JointOptions, JointProcessor
    from lib_layout_retouch.retouch.editor import LayerRoles

    n_txt, grid = 5, (4, 4)
    options = JointOptions(grid, place=lambda x, pe: x, reference_rope=SHARED)
    roles = LayerRoles("b", copies_layout=False, paints=True, blends=False, records_maps=False)
    proc = JointProcessor(roles, 2, options)
    index = torch.full((1, *grid), NO_REGION)
    index[0, :2], index[0, 3] = 0, 1
    state = StepState(
        RowPlan.build([(REFERENCE, 2), (LAYOUT, 1), (TARGET, 1)], halves=(COND,)),
        paint_identity=True,
        regions=LayerRegions(index, (8, 8)),  # a Flux latent of 8×8: 4×4 image tokens
        reference_groups=(1, 1),
    )
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 2, n_txt + 16, 8, generator=g) for _ in range(3))

    def run(k, v):
        at = proc.at_layer(state)
        results = StepResults([[0], [1]], (8, 8))
        return proc.joint(state, at, results, q.clone(), k.clone(), v.clone(), None, n_txt)

    a = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, n_txt:] += 1.0  # reference 1's image tokens (row 1) change
    v2[1, :, n_txt:] -= 1.0
    b = run(k2, v2)
    cells = index[0].reshape(-1)
    image = a[3, :, n_txt:], b[3, :, n_txt:]
    assert torch.equal(image[0][:, cells == 0], image[1][:, cells == 0])
    assert not torch.allclose(image[0][:, cells == 1], image[1][:, cells == 1], atol=1e-4)
    assert torch.equal(a[3, :, :n_txt], b[3, :, :n_txt])  # the text tokens keep their own


@pytest.fixture(scope="module")
def flux_two(tmp_path_factory, tiny_clip_dir):
    from tests.fixtures.flux import build_tiny_flux_model, make_tiny_t5_folder

    model = build_tiny_flux_model(
        make_tiny_t5_folder(str(tmp_path_factory.mktemp("t5"))), tiny_clip_dir
    )
    prompts = derive_subject_prompts(DOG_CAT, WORDS)
    rows = subject_rows(
        lambda p, ph: model.family.subject_tokens(model, p, ph), DOG_CAT, prompts.subject_words()
    )
    conds = pl.encode_prompts(model, prompts, "", reference_subjects=[0, 1])
    refs = torch.cat([model.encode(photo_tensor()), model.encode(photo_tensor(CAT_PHOTO))])
    return (
        model,
        rows,
        conds,
        refs,
        0.6 * torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7)),
    )


def test_two_subjects_on_flux(flux_two):
    model, rows, conds, refs, layouts = flux_two
    assert conds.reference["crossattn"].shape[0] == 2  # one y_r row per photo
    res = _run(
        flux_two,
    )
    assert res.regions.shape[0] == 1 and res.subject_maps.shape[0] == 2
    assert torch.equal(res.masks[0] > 0, res.regions[0] != NO_REGION)
    on = _lora_like(model.transformer)
    scoped = _run(flux_two, subject_weights=[on, None])
    assert not torch.equal(scoped.latents, res.latents)
    assert not any("forward" in m.__dict__ for m in model.transformer.modules())


def test_two_subjects_on_sdxl_each_photo_with_its_own_prompt_and_size_terms(tmp_path):
    from lib_layout_retouch.conditioning import SizeTerms
    from tests.fixtures import sdxl as TS

    model = LdmModel(TS.build("ldm", str(tmp_path), seed=0))
    prompts = derive_subject_prompts(DOG_CAT, WORDS)
    sizes = [SizeTerms((96, 64), (16, 0), (64, 64)), SizeTerms((64, 80), (0, 8), (64, 64))]
    conds = pl.encode_prompts(
        model, prompts, "", image_size=(64, 64), reference_size=sizes, reference_subjects=[0, 1]
    )
    one = [model.conditioning([prompts.reference_of_subject(k)], sizes[k]) for k in (0, 1)]
    for k in (0, 1):  # each row: its subject's y_r, its photo's size terms
        assert torch.equal(conds.reference["crossattn"][k], one[k]["crossattn"][0])
        assert torch.equal(conds.reference["vector"][k], one[k]["vector"][0])
    # the target's tokens name both subjects: y_r, encoded beside y_p (another batch of the text
    # encoders than this one alone, so up to their rounding), not y_p
    target = model.conditioning([prompts.reference], model.generation_size(64, 64))
    roundings = network_roundings(model.ldm.conditioner)
    tol = assert_rounding_close(conds.target["crossattn"], target["crossattn"], roundings)
    assert_differs_beyond(conds.layout["crossattn"], target["crossattn"], tol)
    rows = subject_rows(
        lambda p, ph: model.family.subject_tokens(model, p, ph), DOG_CAT, prompts.subject_words()
    )
    refs = torch.cat([model.encode(photo_tensor()), model.encode(photo_tensor(CAT_PHOTO))])
    layouts = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    res = _run((model, rows, conds, refs, layouts))
    assert res.regions is not None and res.masks.shape == (1, 8, 8)


def test_regions_image_round_trip():
    from lib_layout_retouch.job import SUBJECT_COLOURS, regions_from_image, regions_to_image

    index = torch.tensor([[0, 1, -1], [2, 2, 0]])
    img = regions_to_image(index, (6, 4))
    assert img.size == (6, 4) and img.getpixel((0, 0)) == SUBJECT_COLOURS[0]
    assert img.getpixel((4, 0)) == (0, 0, 0)
    assert regions_from_image(img)[::2, ::2].tolist() == index.tolist()


# -- which LoRA tag is each subject's ----------------------------------------------------------------
def _lora_subjects(*specs):
    return [SubjectParams(personalization=kind, lora=lora) for kind, lora in specs]


def test_lora_tags_go_to_the_lora_subjects_in_order():
    from lib_layout_retouch.subjects import subject_loras

    tags = ["my_dog", "my_cat", "style"]
    two = _lora_subjects(("lora", ""), ("lora", ""))
    assert subject_loras(two, tags) == ["my_dog", "my_cat"]
    # a named tag is taken first; the empty ones take the rest in order; other kinds get none
    named = _lora_subjects(("lora", ""), ("textual_inversion", ""), ("lora", "<lora:MY_DOG:0.7>"))
    assert subject_loras(named, tags) == ["my_cat", None, "my_dog"]
    assert subject_loras(_lora_subjects(("photo", ""), ("lora", "style")), tags) == [None, "style"]


@pytest.mark.parametrize(
    "specs, tags, message",
    [
        (
            [("lora", ""), ("lora", "my_cat")],
            ["my_dog"],
            "subject 2: its LoRA 'my_cat' is not among the prompt's LoRA tags (my_dog): add "
            "<lora:my_cat:1> to the prompt",
        ),
        (
            [("lora", ""), ("lora", "")],
            ["my_dog"],
            "subject 2: it is learned as a LoRA but the prompt has no LoRA tag left for it",
        ),
        (
            [("photo", ""), ("lora", "a"), ("lora", "A")],
            ["a", "b"],
            "subject 3: its LoRA 'a' is subject 2's too",
        ),
        ([("lora", "")], [], "it is learned as a LoRA but the prompt has no LoRA tag left"),
    ],
)
def test_lora_subject_without_its_tag_is_refused(specs, tags, message):
    from lib_layout_retouch.subjects import subject_loras

    with pytest.raises(LayoutRetouchError) as e:
        subject_loras(_lora_subjects(*specs), tags)
    assert e.value.message.startswith(message), e.value.message
    assert e.value.parameter == ("personalization" if message.startswith("it is") else "subjects")
