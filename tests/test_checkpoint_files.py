"""A checkpoint's UNet architecture from its .safetensors header, without loading tensors."""

import torch
from safetensors.torch import save_file

from lib_layout_retouch import checkpoints as cf

SD1 = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
    "model.diffusion_model.output_blocks.0.1.attn2.to_k.weight": torch.zeros(32, 768),
    "cond_stage_model.x": torch.zeros(2),
}
SDXL = dict(SD1, **{"model.diffusion_model.label_emb.0.0.weight": torch.zeros(32, 2816)})


def _own(state):
    return {k[len(cf.UNET_PREFIX) :]: tuple(v.shape) for k, v in state.items() if "diffusion" in k}


def test_shapes_from_the_header(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_file(SD1, path)
    assert cf.unet_shapes(path) == _own(SD1)
    assert cf.unet_mismatch(cf.unet_shapes(path), _own(SD1)) == ""


def test_other_architecture_and_size(tmp_path):
    xl = str(tmp_path / "xl.safetensors")
    save_file(SDXL, xl)
    why = cf.unet_mismatch(cf.unet_shapes(xl), _own(SD1))
    assert "SDXL" in why and "SD1" in why, why
    wide = dict(SD1)
    wide["model.diffusion_model.output_blocks.0.1.attn2.to_k.weight"] = torch.zeros(32, 48)
    path = str(tmp_path / "wide.safetensors")
    save_file(wide, path)
    assert "another size" in cf.unet_mismatch(cf.unet_shapes(path), _own(SD1))
    none = str(tmp_path / "te.safetensors")
    save_file({"cond_stage_model.x": torch.zeros(2)}, none)
    assert "no SD UNet" in cf.unet_mismatch(cf.unet_shapes(none), _own(SD1))


def test_unreadable_files_are_unknown(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"pickle")
    assert cf.unet_shapes(str(ckpt)) is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 20)
    assert cf.unet_shapes(str(bad)) is None
    assert cf.unet_shapes(str(tmp_path / "missing.safetensors")) is None
