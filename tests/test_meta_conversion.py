"""Meta ``.pth`` checkpoints: key mapping, architecture inference and outputs against a reference.

``meta_forward`` below is an independent functional implementation of Meta's
DinoVisionTransformer forward pass (dinov2/models/vision_transformer.py), reading Meta's own key
names, with its position-embedding resize: ``scale_factor=(grid + 0.1) / native`` for the
original models, antialiased exact-size resize for the register models.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dinov2_hf.modeling.convert_meta import from_meta, infer_config_from_meta, meta_to_ours_state_dict


def meta_state_dict(dim=64, depth=2, patch=14, grid=4, registers=0, swiglu_hidden=None, seed=0, chunks=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    sd = {
        "cls_token": rand(1, 1, dim),
        "pos_embed": rand(1, grid * grid + 1, dim),
        "mask_token": rand(1, dim),
        "patch_embed.proj.weight": rand(dim, 3, patch, patch),
        "patch_embed.proj.bias": rand(dim),
        "norm.weight": 1 + rand(dim),
        "norm.bias": rand(dim),
    }
    if registers:
        sd["register_tokens"] = rand(1, registers, dim)
    for i in range(depth):
        prefix = f"blocks.{i // (depth // chunks)}.{i}." if chunks else f"blocks.{i}."
        block = {
            "norm1.weight": 1 + rand(dim), "norm1.bias": rand(dim),
            "attn.qkv.weight": rand(3 * dim, dim), "attn.qkv.bias": rand(3 * dim),
            "attn.proj.weight": rand(dim, dim), "attn.proj.bias": rand(dim),
            "ls1.gamma": rand(dim) + 0.5, "ls2.gamma": rand(dim) + 0.5,
            "norm2.weight": 1 + rand(dim), "norm2.bias": rand(dim),
        }
        if swiglu_hidden:
            block.update({"mlp.w12.weight": rand(2 * swiglu_hidden, dim), "mlp.w12.bias": rand(2 * swiglu_hidden),
                          "mlp.w3.weight": rand(dim, swiglu_hidden), "mlp.w3.bias": rand(dim)})
        else:
            block.update({"mlp.fc1.weight": rand(4 * dim, dim), "mlp.fc1.bias": rand(4 * dim),
                          "mlp.fc2.weight": rand(dim, 4 * dim), "mlp.fc2.bias": rand(dim)})
        sd.update({prefix + k: v for k, v in block.items()})
    return sd


def meta_forward(sd, x, num_heads, masks=None, offset=0.1, antialias=False):
    """Meta's DinoVisionTransformer.forward_features, written out functionally."""
    dim = sd["pos_embed"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    batch, _, h, w = x.shape
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    if masks is not None:
        tokens = torch.where(masks.unsqueeze(-1), sd["mask_token"].unsqueeze(0), tokens)
    tokens = torch.cat([sd["cls_token"].expand(batch, -1, -1), tokens], dim=1)
    n_pos = sd["pos_embed"].shape[1] - 1
    if tokens.shape[1] - 1 == n_pos and h == w:
        pos = sd["pos_embed"]
    else:
        m = int(math.sqrt(n_pos))
        grid = sd["pos_embed"][:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        if offset:
            resized = F.interpolate(grid, scale_factor=((h // patch + offset) / m, (w // patch + offset) / m),
                                    mode="bicubic", antialias=antialias)
        else:
            resized = F.interpolate(grid, size=(h // patch, w // patch), mode="bicubic", antialias=antialias)
        pos = torch.cat([sd["pos_embed"][:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    tokens = tokens + pos
    if "register_tokens" in sd:
        tokens = torch.cat([tokens[:, :1], sd["register_tokens"].expand(batch, -1, -1), tokens[:, 1:]], dim=1)
    block_ids = sorted({k.split(".")[-3] if k.count(".") == 4 else k.split(".")[1]
                        for k in sd if k.startswith("blocks.") and k.endswith("norm1.weight")}, key=int)
    for i in block_ids:
        key = next(k for k in sd if k.endswith(f".{i}.norm1.weight")).rsplit("norm1.weight", 1)[0]
        y = F.layer_norm(tokens, (dim,), sd[key + "norm1.weight"], sd[key + "norm1.bias"], eps=1e-6)
        n = y.shape[1]
        qkv = F.linear(y, sd[key + "attn.qkv.weight"], sd[key + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, n, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, n, dim)
        y = F.linear(y, sd[key + "attn.proj.weight"], sd[key + "attn.proj.bias"])
        tokens = tokens + y * sd[key + "ls1.gamma"]
        y = F.layer_norm(tokens, (dim,), sd[key + "norm2.weight"], sd[key + "norm2.bias"], eps=1e-6)
        if key + "mlp.w12.weight" in sd:
            x1, x2 = F.linear(y, sd[key + "mlp.w12.weight"], sd[key + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, sd[key + "mlp.w3.weight"], sd[key + "mlp.w3.bias"])
        else:
            y = F.linear(F.gelu(F.linear(y, sd[key + "mlp.fc1.weight"], sd[key + "mlp.fc1.bias"])),
                         sd[key + "mlp.fc2.weight"], sd[key + "mlp.fc2.bias"])
        tokens = tokens + y * sd[key + "ls2.gamma"]
    return F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


@pytest.mark.parametrize(
    "registers, swiglu_hidden, chunks",
    [(0, None, 0), (4, None, 0), (0, 176, 0), (4, 176, 2)],
)
@pytest.mark.parametrize("size", [(56, 56), (98, 98), (70, 42)])
def test_meta_outputs_match_reference(registers, swiglu_hidden, chunks, size):
    sd = meta_state_dict(registers=registers, swiglu_hidden=swiglu_hidden, chunks=chunks)
    model = from_meta(sd)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 1)
    assert config.num_register_tokens == registers and config.use_swiglu_ffn == bool(swiglu_hidden)
    x = torch.randn(2, 3, *size)
    masks = torch.rand(2, (size[0] // 14) * (size[1] // 14)) < 0.3
    offset, antialias = (0.0, True) if registers else (0.1, False)
    with torch.no_grad():
        expected = meta_forward(sd, x, num_heads=1, masks=masks, offset=offset, antialias=antialias)
        actual = model(x, bool_masked_pos=masks).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_meta_offset_mode_differs_from_exact_grid():
    """The three resize modes are really different at non-native sizes (so parity needs each)."""
    sd = meta_state_dict()
    x = torch.randn(1, 3, 98, 70)
    outputs = {}
    for mode in ("meta", "transformers", "antialias"):
        with torch.no_grad():
            outputs[mode] = from_meta(sd, pos_embed_interpolation=mode)(x).last_hidden_state
    assert (outputs["meta"] - outputs["transformers"]).abs().max() > 1e-4
    assert (outputs["antialias"] - outputs["transformers"]).abs().max() > 1e-4


def test_infer_config_released_shapes():
    """vitg14-like SwiGLU hidden size 4096 -> mlp_ratio 4, heads = width / 64."""
    sd = {
        "pos_embed": torch.zeros(1, 37 * 37 + 1, 1536),
        "patch_embed.proj.weight": torch.zeros(1536, 3, 14, 14),
        "register_tokens": torch.zeros(1, 4, 1536),
        "blocks.0.norm1.weight": torch.zeros(1536),
        "blocks.39.norm1.weight": torch.zeros(1536),
        "blocks.0.attn.qkv.bias": torch.zeros(3 * 1536),
        "blocks.0.mlp.w12.weight": torch.zeros(2 * 4096, 1536),
    }
    config = infer_config_from_meta(sd)
    assert (config.num_hidden_layers, config.num_attention_heads, config.image_size) == (40, 24, 518)
    assert config.use_swiglu_ffn and config.intermediate_size == 4096 and config.mlp_ratio == 4.0
    assert config.pos_embed_interpolation == "antialias" and config.num_register_tokens == 4
    assert infer_config_from_meta(sd, head_dim=128).num_attention_heads == 12


def test_meta_key_mapping_is_complete():
    sd = meta_state_dict(registers=4, swiglu_hidden=176, chunks=2)
    config = infer_config_from_meta(sd)
    ours = meta_to_ours_state_dict(sd, config)
    from dinov2_hf import Dinov2HFModel

    assert set(ours) == set(Dinov2HFModel(config).state_dict())
    assert torch.equal(ours["encoder.layer.1.mlp.w12.weight"], sd["blocks.1.1.mlp.w12.weight"])
    assert torch.equal(ours["encoder.layer.0.layer_scale2.lambda1"], sd["blocks.0.0.ls2.gamma"])


def test_training_checkpoint_file_with_teacher_prefix(tmp_path):
    sd = meta_state_dict()
    checkpoint = {
        "teacher": {**{f"teacher.backbone.{k}": v for k, v in sd.items()}, "teacher.dino_head.last_layer.weight": torch.zeros(3)},
        "iteration": 10,
    }
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(checkpoint, path)
    model = from_meta(path)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, meta_forward(sd, x, num_heads=1), rtol=0, atol=1e-5)


def test_corrupt_and_foreign_files_fail_clearly(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read"):
        from_meta(corrupt)
    with pytest.raises(FileNotFoundError):
        from_meta(tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="pos_embed"):
        from_meta(other)
    for name, content, message in [
        ("tensor.pth", torch.zeros(3), "it holds a Tensor; a Meta DINOv2 checkpoint is a dict of backbone tensors"),
        ("list.pth", [torch.zeros(3)], "it holds a list"),
        ("int_keys.pth", {0: torch.zeros(3)}, "it has no 'pos_embed' weight"),
    ]:
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name} is not a Meta checkpoint: {message}"):
            from_meta(tmp_path / name)
    no_patch = {k: v for k, v in meta_state_dict().items() if not k.startswith("patch_embed.")}
    with pytest.raises(ValueError, match="no patch_embed.proj.weight found"):
        from_meta(no_patch)
    no_mlp = {k: v for k, v in meta_state_dict().items() if ".mlp." not in k}
    torch.save(no_mlp, tmp_path / "no_mlp.pth")
    with pytest.raises(ValueError, match=r"no_mlp.pth: No MLP weights"):
        from_meta(tmp_path / "no_mlp.pth")
    with pytest.raises(ValueError, match="the state dict given is not a Meta checkpoint: it holds a Tensor"):
        from_meta(torch.zeros(3))
