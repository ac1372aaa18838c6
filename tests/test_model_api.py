"""Model API: presets, input validation, intermediate layers, backbone, attention backends, init."""

import pytest
import torch
from conftest import randomize_

from dinov2_hf import Dinov2HFBackbone, Dinov2HFConfig, Dinov2HFModel


@pytest.mark.parametrize(
    "preset, millions, registers",
    [("vits14", 22.06, 0), ("vitb14", 86.58, 0), ("vitl14", 304.37, 4), ("vitg14", 1136.5, 4)],
)
def test_presets_match_released_sizes(preset, millions, registers):
    config = Dinov2HFConfig.from_preset(preset, num_register_tokens=registers)
    with torch.device("meta"):
        model = Dinov2HFModel(config)
    # Parameter counts of the released facebook/dinov2-{small,base,large,giant} checkpoints (518 px grid).
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.002, count
    assert config.num_register_tokens == registers
    assert config.hidden_size // config.num_attention_heads == 64
    if preset == "vitg14":
        assert config.use_swiglu_ffn and config.intermediate_size == 4096


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="Unknown preset 'vith14'.*vitb14"):
        Dinov2HFConfig.from_preset("vith14")
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        Dinov2HFConfig(pos_embed_interpolation="bilinear")
    with pytest.raises(ValueError, match="divisible"):
        Dinov2HFConfig(hidden_size=100, num_attention_heads=3)


def test_bad_inputs_raise_clear_errors(tiny_kwargs):
    model = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)).eval()
    with pytest.raises(ValueError, match="1 channels but the model expects 3.*RGB"):
        model(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="50x56 is not a positive multiple of the patch size 14"):
        model(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(torch.randn(3, 56, 56))
    with pytest.raises(ValueError, match=r"bool_masked_pos has shape \(1, 15\).*need \(1, 16\)"):
        model(torch.randn(1, 3, 56, 56), bool_masked_pos=torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 image batches but 1 masks"):
        model.forward_packed([torch.randn(1, 3, 56, 56), torch.randn(1, 3, 28, 28)], [None])


def test_mask_accepts_grid_and_integer_masks(tiny_kwargs):
    model = randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs))).eval()
    x = torch.randn(2, 3, 56, 56)
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        flat = model(x, bool_masked_pos=mask).last_hidden_state
        grid = model(x, bool_masked_pos=mask.view(2, 4, 4).int()).last_hidden_state
        none = model(x).last_hidden_state
    assert torch.equal(flat, grid)
    assert not torch.allclose(flat, none)


def test_get_intermediate_layers(tiny_kwargs):
    config = Dinov2HFConfig(**tiny_kwargs, num_register_tokens=2)
    model = randomize_(Dinov2HFModel(config)).eval()
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        last_two = model.get_intermediate_layers(x, n=2, return_class_token=True)
        maps = model.get_intermediate_layers(x, n=[0], reshape=True, norm=False)
    assert len(last_two) == 2
    patches, cls = last_two[1]
    normed = model.layernorm(hidden[2])
    torch.testing.assert_close(patches, normed[:, 3:])
    torch.testing.assert_close(cls, normed[:, 0])
    assert maps[0].shape == (2, 64, 4, 6)
    torch.testing.assert_close(maps[0], hidden[1][:, 3:].reshape(2, 4, 6, 64).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[5])


def test_backbone_feature_maps(tiny_kwargs):
    config = Dinov2HFConfig(**tiny_kwargs, num_register_tokens=4, out_features=["stage1", "stage2"])
    model = randomize_(Dinov2HFModel(config)).eval()
    backbone = Dinov2HFBackbone(config).eval()
    backbone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        maps = backbone(x).feature_maps
        hidden = model(x, output_hidden_states=True).hidden_states
    assert [m.shape for m in maps] == [(2, 64, 4, 6)] * 2
    expected = model.layernorm(hidden[1])[:, 5:].reshape(2, 4, 6, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps[0], expected)
    assert backbone.channels == [64, 64]


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_attention_backends_agree_with_sdpa(tiny_kwargs, implementation):
    config = Dinov2HFConfig(**tiny_kwargs)
    model = randomize_(Dinov2HFModel(config)).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = model(x).last_hidden_state
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        actual = model(x).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_default_attention_is_sdpa_and_not_causal(tiny_kwargs):
    model = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs))
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.attention.is_causal is False for layer in model.encoder.layer)
    # A causal mask would make the CLS token (position 0) blind to the patches.
    randomize_(model).eval()
    x = torch.randn(1, 3, 56, 56)
    y = x.clone()
    y[..., -14:, -14:] += 1  # change only the last patch
    with torch.no_grad():
        assert not torch.allclose(model(x).pooler_output, model(y).pooler_output)


def test_initialisation_follows_dinov2(tiny_kwargs):
    torch.manual_seed(0)
    model = Dinov2HFModel(Dinov2HFConfig(**{**tiny_kwargs, "layerscale_value": 1e-5}, num_register_tokens=2))
    assert torch.all(model.encoder.layer[0].layer_scale1.lambda1 == 1e-5)
    assert torch.all(model.embeddings.mask_token == 0)
    assert model.embeddings.cls_token.abs().max() < 1e-4
    assert model.embeddings.register_tokens.abs().max() < 1e-4
    assert 0.01 < model.embeddings.position_embeddings.std() < 0.03
    assert 0.01 < model.encoder.layer[0].attention.qkv.weight.std() < 0.03
    assert torch.all(model.encoder.layer[0].attention.qkv.bias == 0)
    torch.manual_seed(0)
    again = Dinov2HFModel(Dinov2HFConfig(**{**tiny_kwargs, "layerscale_value": 1e-5}, num_register_tokens=2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
