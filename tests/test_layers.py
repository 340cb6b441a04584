"""Layer tables: SD1 data and the structural rule agree; the tiny model gets sensible sets."""

import torch

from lib_layout_retouch.unet.layers import (
    SD1_LAYERS,
    attention_modules,
    check_layer_table,
    infer_layer_table,
    layer_table_for,
)

SD1_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=False,
    legacy=False,
)


def sd1_unet_on_meta():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):  # the real SD1 structure, no memory
        return UNetModel(**SD1_UNET)


def test_sd1_table_matches_the_paper_layers_and_the_structural_rule():
    unet = sd1_unet_on_meta()
    names = list(attention_modules(unet))
    assert len(names) == 32
    check_layer_table(SD1_LAYERS, unet)
    assert layer_table_for(unet) is SD1_LAYERS
    inferred = infer_layer_table(unet)
    assert inferred.reference_layers == SD1_LAYERS.reference_layers
    assert set(inferred.mask_layers) == set(SD1_LAYERS.mask_layers)
    # decoder transformer blocks 10–15 of 16 (MasaCtrl start_layer=10)
    blocks = [n for n in names if n.endswith("attn1")]
    assert tuple(blocks[10:]) == SD1_LAYERS.reference_layers


def test_tiny_model_inferred_table(tiny_ldm):
    unet = tiny_ldm.model.diffusion_model
    table = layer_table_for(unet)
    assert table.name == "inferred"
    assert table.mask_layers == (
        "input_blocks.3.1.transformer_blocks.0.attn2",
        "output_blocks.0.1.transformer_blocks.0.attn2",
        "output_blocks.1.1.transformer_blocks.0.attn2",
    )
    assert table.reference_layers == (
        "output_blocks.2.1.transformer_blocks.0.attn1",
        "output_blocks.3.1.transformer_blocks.0.attn1",
    )
    assert table.swaps_every_layer()
