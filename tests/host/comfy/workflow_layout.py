"""Where each node of the example workflows sits, as a person lays them out: the loaders and the
photo on the left, our node next to them (nothing below it: after a run ComfyUI adds the latent
preview and the node's text to it, ≈ 260 px), the decoders in a narrow column, the saved and
previewed images in a 2 × 2 grid of nodes large enough for a square image (a smaller image node grows
to fit its image after a run), and under them a *Preview Any* of our node's `info` output, wide
enough to show it whole (the text on our node itself gets ComfyUI's small progress-text box).
`test_comfy_browser.py` applies this to the API-format files with LR_COMFY_EXPORT set to write
workflows/*.json, and checks after a run that no two node boxes intersect.

{workflow: {node id: (x, y, width, height)}}: pos and size as LiteGraph stores them (the title bar,
LiteGraph.NODE_TITLE_HEIGHT = 30, is above pos); height None keeps the node's computed height.
"""

from __future__ import annotations

TITLE = 30
ROW = 30  # pos.y of the first row: its title bar starts at 0
GAP = 40
LEFT = 360  # the loaders' column (their long titles)
NODE = 400  # our nodes' width (their widgets' labels and values)
SMALL = 210  # VAE Decode, Convert Mask to Image (its title)
IMAGE_NODE = (320, 340)  # Save / Preview Image: a square image under the title and the widget
BELOW_IMAGE = ROW + IMAGE_NODE[1] + TITLE + GAP  # the second row of image nodes
BELOW_IMAGES = BELOW_IMAGE + IMAGE_NODE[1] + TITLE + GAP  # under both rows
INFO_HEIGHT = 150  # Preview Any of the `info` output: five lines of text in full


def _left(second_height: int = 98) -> dict:
    """The two loaders and the reference photo (LoadImage shows it) at x 0."""
    return {
        1: (0, ROW, LEFT, None),
        2: (0, ROW + 160, LEFT, None),
        3: (0, ROW + 160 + second_height + TITLE + GAP, LEFT, 360),
    }


def _sampler_outputs(x: int) -> dict:
    """The decoders and the mask conversion beside the Sampler's outputs, then the retouched
    (Save), layout, blend mask and attention map images in two columns of two."""
    w, h = IMAGE_NODE
    images = x + SMALL + GAP
    return {
        5: (x, ROW, SMALL, None),
        7: (x, ROW + 130, SMALL, None),
        9: (x, ROW + 260, SMALL, None),
        6: (images, ROW, w, h),
        8: (images, BELOW_IMAGE, w, h),
        10: (images + w + GAP, ROW, w, h),
        11: (images + w + GAP, BELOW_IMAGE, w, h),
        13: (images, BELOW_IMAGES, 2 * w + GAP, INFO_HEIGHT),  # what the node used, under them
    }


SAMPLER_X = LEFT + GAP
PHOTO_Y = ROW + 160  # the first photo under the checkpoint loader
SECOND_PHOTO_Y = PHOTO_Y + 360 + TITLE + GAP
LAYOUTS = {
    "layout_retouch_dreambooth": {
        **_left(),  # personalized checkpoint, vanilla checkpoint, reference photo
        4: (SAMPLER_X, ROW, NODE, None),  # Layout-and-Retouch Sampler
        **_sampler_outputs(SAMPLER_X + NODE + GAP),
    },
    "layout_retouch_lora": {
        **_left(126),  # base checkpoint, LoRA loader, reference photo
        4: (SAMPLER_X, ROW, NODE, None),
        **_sampler_outputs(SAMPLER_X + NODE + GAP),
    },
    "layout_retouch_two_subjects": {
        1: (0, ROW, LEFT, None),  # base checkpoint
        2: (0, PHOTO_Y, LEFT, 360),  # subject 1's photo
        3: (0, SECOND_PHOTO_Y, LEFT, 360),  # subject 2's photo
        14: (SAMPLER_X, PHOTO_Y, NODE, None),  # Subject 1, beside its photo
        15: (SAMPLER_X, SECOND_PHOTO_Y, NODE, None),  # Subject 2, chained from Subject 1
        4: (SAMPLER_X + NODE + GAP, ROW, NODE, None),  # Sampler (its 'subjects' from Subject 2)
        **_sampler_outputs(SAMPLER_X + 2 * (NODE + GAP)),  # 10: the regions, 11: the blend mask
    },
    "layout_retouch_split_stages": {
        **_left(),
        12: (SAMPLER_X, ROW, NODE, None),  # Layout (stage 1)
        4: (SAMPLER_X + NODE + GAP, ROW, NODE, None),  # Retouch (stage 2)
        5: (SAMPLER_X + 2 * (NODE + GAP), ROW, SMALL, None),  # decode retouched
        7: (SAMPLER_X + 2 * (NODE + GAP), ROW + 130, SMALL, None),  # decode layout
        6: (SAMPLER_X + 2 * (NODE + GAP) + SMALL + GAP, ROW, *IMAGE_NODE),  # save
        8: (SAMPLER_X + 2 * (NODE + GAP) + SMALL + GAP, BELOW_IMAGE, *IMAGE_NODE),  # layout
        # what the Retouch node used, under the images
        13: (SAMPLER_X + 2 * (NODE + GAP) + SMALL + GAP, BELOW_IMAGES, IMAGE_NODE[0], INFO_HEIGHT),
    },
}
