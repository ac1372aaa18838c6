"""Conversion of Meta's DINOv2 checkpoints (the official ``.pth`` files, or training checkpoints) to our model.

Meta's ``DinoVisionTransformer`` keeps fused ``qkv`` / ``w12`` projections as we do, so the conversion
is a rename table alone; the architecture is inferred from the tensor shapes. Everything is exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_dinov2_hf import Dinov2HFConfig, swiglu_hidden_size
from .convert_transformers import StateDict, rename_keys
from .modeling_dinov2_hf import Dinov2HFModel

# Meta's DinoVisionTransformer names -> ours. ``blocks.{chunk}.{i}`` (FSDP block chunks) keeps the
# global block index ``i``, so chunked and plain checkpoints map alike.
META_TO_OURS_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^register_tokens$", "embeddings.register_tokens"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(?:\d+\.)?(\d+)\.attn\.qkv\.", r"encoder.layer.\1.attention.qkv."),
    (r"^blocks\.(?:\d+\.)?(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.proj."),
    (r"^blocks\.(?:\d+\.)?(\d+)\.ls1\.gamma$", r"encoder.layer.\1.layer_scale1.lambda1"),
    (r"^blocks\.(?:\d+\.)?(\d+)\.ls2\.gamma$", r"encoder.layer.\1.layer_scale2.lambda1"),
    (r"^blocks\.(?:\d+\.)?(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.", r"encoder.layer.\1.\2."),
    (r"^norm\.", "layernorm."),
]
META_IGNORED_KEYS = re.compile(r"^(head\.|dino_head\.|ibot_head\.)")
# What a Meta checkpoint holds, for the errors about files that hold something else.
META_CHECKPOINT_CONTENTS = (
    "a Meta DINOv2 checkpoint is a dict of backbone tensors (pos_embed, cls_token, patch_embed.proj.weight, "
    "blocks.N....), or a training checkpoint holding one under 'teacher' or 'model'"
)


def load_meta_state_dict(path: str | Path) -> StateDict:
    """Backbone weights from a Meta ``.pth`` file, loaded with ``weights_only=True``.

    Accepts the released ``dinov2_vit*14[_reg4]_pretrain.pth`` files (a plain backbone state dict)
    and training checkpoints (``{"model": ...}`` or ``{"teacher": ...}`` with ``backbone.`` /
    ``teacher.backbone.`` prefixes; the teacher is preferred).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such checkpoint file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, or pickled objects other than tensors
        raise ValueError(f"Could not read {path} as a PyTorch weights file (weights_only=True): {error}") from error
    try:
        return extract_meta_backbone(checkpoint)
    except ValueError as error:  # the message names the file, not just what is wrong inside it
        raise ValueError(f"{path} is not a Meta checkpoint: {error}") from None


def extract_meta_backbone(checkpoint: Mapping) -> StateDict:
    """The backbone state dict (prefix stripped) inside a Meta checkpoint dictionary.

    Raises ValueError for anything else (a bare tensor, a list, a dict without ``pos_embed``)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"it holds a {type(checkpoint).__name__}; {META_CHECKPOINT_CONTENTS}.")
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    prefixes = [k[: -len("pos_embed")] for k in checkpoint if isinstance(k, str) and k.endswith("pos_embed")]
    if not prefixes:
        raise ValueError(f"it has no 'pos_embed' weight; {META_CHECKPOINT_CONTENTS}.")
    prefix = next((p for p in prefixes if p.startswith("teacher")), sorted(prefixes, key=len)[0])
    return {
        k[len(prefix) :]: v
        for k, v in checkpoint.items()
        if isinstance(k, str) and k.startswith(prefix) and torch.is_tensor(v)
    }


def infer_config_from_meta(
    state_dict: Mapping[str, torch.Tensor], head_dim: int = 64, pos_embed_interpolation: str | None = None
) -> Dinov2HFConfig:
    """Architecture of a Meta backbone from its weights alone.

    Width, depth, patch size, registers, MLP or SwiGLU (and its hidden size) come from tensor
    shapes; the number of heads is ``hidden / head_dim`` (64 in every released model). The
    interpolation defaults to what the released models use: Meta's offset 0.1 without registers,
    antialiasing with registers. Raises ValueError when a weight it reads the architecture from is absent
    or of the wrong rank.
    """
    absent = [k for k in ("pos_embed", "patch_embed.proj.weight") if k not in state_dict]
    if absent:
        raise ValueError(f"no {', '.join(absent)} found: {META_CHECKPOINT_CONTENTS}.")
    if state_dict["pos_embed"].ndim != 3 or state_dict["patch_embed.proj.weight"].ndim != 4:
        raise ValueError(
            f"pos_embed {tuple(state_dict['pos_embed'].shape)} / patch_embed.proj.weight "
            f"{tuple(state_dict['patch_embed.proj.weight'].shape)}: expected (1, positions, hidden) / "
            "(hidden, channels, patch, patch)."
        )
    pos_embed = state_dict["pos_embed"]
    patch_weight = state_dict["patch_embed.proj.weight"]
    hidden_size, patch_size = pos_embed.shape[-1], patch_weight.shape[-1]
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if grid * grid != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1] - 1} patch positions, not a square grid.")
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(?:\d+\.)?(\d+)\.norm1\.weight$", k))}
    if not block_ids:
        raise ValueError("No transformer blocks ('blocks.N.norm1.weight') found in the checkpoint.")
    use_swiglu = "blocks.0.mlp.w12.weight" in state_dict or any(".mlp.w12.weight" in k for k in state_dict)
    fc_key = next((k for k in state_dict if k.endswith(".mlp.w12.weight" if use_swiglu else ".mlp.fc1.weight")), None)
    if fc_key is None:
        raise ValueError("No MLP weights ('blocks.N.mlp.fc1.weight' or 'blocks.N.mlp.w12.weight') found in the checkpoint.")
    intermediate = state_dict[fc_key].shape[0] // (2 if use_swiglu else 1)
    mlp_ratio = intermediate / hidden_size
    if use_swiglu and swiglu_hidden_size(hidden_size, 4) == intermediate:
        mlp_ratio = 4.0
    if hidden_size % head_dim:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of head_dim={head_dim}; pass head_dim.")
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    qkv_bias_key = next((k for k in state_dict if k.endswith("attn.qkv.bias")), None)
    return Dinov2HFConfig(
        hidden_size=hidden_size,
        num_hidden_layers=max(block_ids) + 1,
        num_attention_heads=hidden_size // head_dim,
        mlp_ratio=mlp_ratio,
        intermediate_size=intermediate,
        use_swiglu_ffn=use_swiglu,
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=patch_weight.shape[1],
        qkv_bias=qkv_bias_key is not None,
        num_register_tokens=registers,
        pos_embed_interpolation=pos_embed_interpolation or ("antialias" if registers else "meta"),
        interpolate_offset=0.0 if registers else 0.1,
    )


def meta_to_ours_state_dict(state_dict: Mapping[str, torch.Tensor], config: Dinov2HFConfig) -> StateDict:
    """Meta backbone weights -> ours. Missing LayerScale (models without it) becomes ones."""
    kept = {k: v for k, v in state_dict.items() if not META_IGNORED_KEYS.match(k)}
    ours = rename_keys(kept, META_TO_OURS_RENAMES)
    for i in range(config.num_hidden_layers):
        for name in ("layer_scale1", "layer_scale2"):
            ours.setdefault(f"encoder.layer.{i}.{name}.lambda1", torch.ones(config.hidden_size))
    return ours


def from_meta(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    head_dim: int = 64,
    pos_embed_interpolation: str | None = None,
) -> Dinov2HFModel:
    """Our model from a Meta DINOv2 checkpoint file or state dict, architecture inferred from the weights.

    Raises ValueError (naming the file) for anything that is not a complete DINOv2 backbone."""
    is_file = isinstance(checkpoint, (str, Path))
    name = str(checkpoint) if is_file else "Meta checkpoint"
    if is_file:
        state_dict = load_meta_state_dict(checkpoint)
    else:
        try:
            state_dict = extract_meta_backbone(checkpoint)
        except ValueError as error:
            raise ValueError(f"the state dict given is not a Meta checkpoint: {error}") from None
    try:
        config = infer_config_from_meta(state_dict, head_dim=head_dim, pos_embed_interpolation=pos_embed_interpolation)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    model = Dinov2HFModel(config)
    missing, unexpected = model.load_state_dict(meta_to_ours_state_dict(state_dict, config), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match the inferred architecture: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return model.eval()
