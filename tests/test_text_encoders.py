"""Stage 1's vanilla text encoder: a copy of the loaded model's transformer with another checkpoint's
weights, swapped in by reference and always restored."""

import copy

import pytest
import torch

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.unet.text_encoders import checkpoint_key, copy_with_weights, swapped
from tests.tolerance import assert_differs_beyond, assert_rounding_close, network_roundings

PREFIX = "cond_stage_model.transformer."


class Wrapped(torch.nn.Module):
    """What the WebUI puts around token embeddings (EmbeddingsWithFixes): the weight under `.wrapped.`."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, ids):
        return self.wrapped(ids)


def vanilla_state(encoder, seed=5):
    """A 'vanilla checkpoint' whose text encoder differs from the loaded one (as after DreamBooth
    fine-tuned the loaded one's)."""
    g = torch.Generator().manual_seed(seed)
    return {
        PREFIX + k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in encoder.transformer.state_dict().items()
    }


def encode(encoder, text="a photo of a dog"):
    with torch.no_grad():
        return encoder.encode([text])


def test_the_vanilla_encoder_gives_the_vanilla_conditioning_and_the_slot_is_restored(tiny_ldm):
    encoder = tiny_ldm.cond_stage_model
    state = vanilla_state(encoder)
    own_before = encode(encoder)
    vanilla = copy_with_weights(encoder.transformer, state, PREFIX, "tiny-vanilla")
    # the reference: the vanilla checkpoint's own encoder, built independently
    reference = copy.deepcopy(encoder)
    reference.transformer.load_state_dict({k[len(PREFIX) :]: v for k, v in state.items()})
    slot = [(encoder, "transformer", PREFIX)]
    with swapped(slot, [vanilla]):
        during = encode(encoder)
    tol = assert_rounding_close(during, encode(reference), network_roundings(reference.transformer))
    assert_differs_beyond(during, own_before, tol)  # the two encoders differ: the test can fail
    assert encoder.transformer is not vanilla and torch.equal(encode(encoder), own_before)
    with pytest.raises(RuntimeError):
        with swapped(slot, [vanilla]):
            raise RuntimeError("boom")
    assert encoder.transformer is not vanilla and torch.equal(encode(encoder), own_before)


def test_the_hosts_wrapped_token_embedding_is_mapped_to_the_checkpoints_name(tiny_ldm):
    encoder = copy.deepcopy(tiny_ldm.cond_stage_model)
    state = vanilla_state(encoder)
    emb = encoder.transformer.text_model.embeddings
    emb.token_embedding = Wrapped(emb.token_embedding)
    assert (
        checkpoint_key("text_model.embeddings.token_embedding.wrapped.weight", PREFIX)
        == PREFIX + "text_model.embeddings.token_embedding.weight"
    )
    vanilla = copy_with_weights(encoder.transformer, state, PREFIX, "tiny-vanilla")
    assert torch.equal(
        vanilla.text_model.embeddings.token_embedding.wrapped.weight,
        state[PREFIX + "text_model.embeddings.token_embedding.weight"],
    )


def test_a_checkpoint_without_a_matching_text_encoder_is_refused_by_name(tiny_ldm):
    encoder = tiny_ldm.cond_stage_model
    state = vanilla_state(encoder)
    state.pop(PREFIX + "text_model.final_layer_norm.weight")
    with pytest.raises(LayoutRetouchError, match="tiny-vanilla") as err:
        copy_with_weights(encoder.transformer, state, PREFIX, "tiny-vanilla")
    assert err.value.parameter == "stage1_text_encoder" and "'loaded'" in str(err.value)
