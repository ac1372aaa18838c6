"""Our Dinov2HFModel against transformers' own Dinov2Model and Dinov2WithRegistersModel."""

import pytest
import torch
from conftest import randomize_
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from dinov2_hf.modeling.convert_transformers import from_transformers

SIZES = [(224, 224), (518, 518), (168, 308)]  # native, 518 px (37x37 grid), non-square non-native


def reference_model(tiny_kwargs, registers: int, swiglu: bool):
    kwargs = dict(tiny_kwargs, use_swiglu_ffn=swiglu)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    return randomize_(model).eval()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_outputs_match_transformers(tiny_kwargs, registers, swiglu, size):
    reference = reference_model(tiny_kwargs, registers, swiglu)
    ours = from_transformers(reference)
    assert ours.config.pos_embed_interpolation == ("antialias" if registers else "transformers")
    height, width = size
    pixel_values = torch.randn(2, 3, height, width)
    mask = torch.rand(2, (height // 14) * (width // 14), generator=torch.Generator().manual_seed(1)) < 0.3
    for bool_masked_pos in (None, mask):
        with torch.no_grad():
            expected = reference(pixel_values, bool_masked_pos=bool_masked_pos)
            actual = ours(pixel_values, bool_masked_pos=bool_masked_pos)
        assert actual.last_hidden_state.shape == expected.last_hidden_state.shape
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(actual.pooler_output, expected.pooler_output, rtol=0, atol=1e-5)


def test_hidden_states_and_attentions_match_transformers(tiny_kwargs):
    reference = reference_model(tiny_kwargs, registers=4, swiglu=False)
    reference.set_attn_implementation("eager")
    ours = from_transformers(reference)
    pixel_values = torch.randn(2, 3, 112, 140)
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True, output_attentions=True)
        actual = ours(pixel_values, output_hidden_states=True, output_attentions=True)
    assert len(actual.hidden_states) == len(expected.hidden_states) == tiny_kwargs["num_hidden_layers"] + 1
    for a, e in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)
    assert len(actual.attentions) == len(expected.attentions)
    for a, e in zip(actual.attentions, expected.attentions):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


def test_gradients_match_transformers(tiny_kwargs):
    reference = reference_model(tiny_kwargs, registers=0, swiglu=False)
    ours = from_transformers(reference)
    pixel_values = torch.randn(2, 3, 98, 98)
    reference(pixel_values).last_hidden_state.square().sum().backward()
    ours(pixel_values).last_hidden_state.square().sum().backward()
    expected = reference.embeddings.patch_embeddings.projection.weight.grad
    torch.testing.assert_close(ours.embeddings.patch_embeddings.projection.weight.grad, expected, rtol=1e-5, atol=1e-5)
    q_grad = reference.encoder.layer[0].attention.q_proj.weight.grad
    torch.testing.assert_close(ours.encoder.layer[0].attention.qkv.weight.grad[:64], q_grad, rtol=1e-5, atol=1e-5)
