"""Checkpoint conversion between our layout, transformers' Dinov2 models and Meta's ``.pth`` files.

Conversions are rename tables (regular expressions applied to each key) plus two fusions:
transformers keeps separate q/k/v and gate/up projections, we (like Meta) keep them fused as
``qkv`` and ``w12``. Everything here is exact: weights are copied, never recomputed.

    transformers Dinov2Model / Dinov2WithRegistersModel  <->  Dinov2HFModel  <-  Meta .pth
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_dinov2_hf import Dinov2HFConfig, swiglu_hidden_size
from .modeling_dinov2_hf import Dinov2HFModel
from .processor import dinov2_image_processor

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# transformers' on-disk (legacy) key names -> its in-memory names (transformers >= 5 renames on load;
# a raw safetensors file of facebook/dinov2-* still holds the legacy ones).
TRANSFORMERS_LEGACY_RENAMES = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),  # already fused gate/up, as ours
    (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
]
# transformers' in-memory names -> ours (after q/k/v and gate/up have been fused).
TRANSFORMERS_TO_OURS_RENAMES = [
    (r"\.attention\.o_proj\.", ".attention.proj."),
    (r"\.mlp\.down_proj\.", ".mlp.w3."),
]
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
# Fusions: (our fused name, the separate transformers names in concatenation order).
FUSED_PROJECTIONS = [
    ("attention.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    ("mlp.w12", ("mlp.gate_proj", "mlp.up_proj")),
]
META_IGNORED_KEYS = re.compile(r"^(head\.|dino_head\.|ibot_head\.)")


def rename_keys(state_dict: Mapping[str, torch.Tensor], renames: list[tuple[str, str]]) -> StateDict:
    """Apply every matching ``(pattern, replacement)`` of a rename table to every key."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def fuse_projections(state_dict: StateDict) -> StateDict:
    """Concatenate separate q/k/v (and gate/up) projections into our fused ``qkv`` (``w12``)."""
    fused = dict(state_dict)
    for key in list(state_dict):
        for fused_name, parts in FUSED_PROJECTIONS:
            match = re.match(rf"^(.*\.){re.escape(parts[0])}\.(weight|bias)$", key)
            if match:
                prefix, kind = match.groups()
                part_keys = [f"{prefix}{part}.{kind}" for part in parts]
                missing = [k for k in part_keys if k not in state_dict]
                if missing:
                    raise KeyError(f"Cannot fuse {fused_name}: missing {missing} in the state dict.")
                fused[f"{prefix}{fused_name}.{kind}"] = torch.cat([state_dict[k] for k in part_keys])
                for k in part_keys:
                    del fused[k]
    return fused


def split_projections(state_dict: StateDict) -> StateDict:
    """Inverse of :func:`fuse_projections`: our ``qkv``/``w12`` into transformers' separate projections."""
    split = dict(state_dict)
    for key, value in state_dict.items():
        for fused_name, parts in FUSED_PROJECTIONS:
            match = re.match(rf"^(.*\.){re.escape(fused_name)}\.(weight|bias)$", key)
            if match:
                prefix, kind = match.groups()
                del split[key]
                for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                    split[f"{prefix}{part}.{kind}"] = chunk.clone()
    return split


def _invert(renames: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(re.escape(replacement), pattern.replace("\\", "")) for pattern, replacement in renames]


def transformers_to_ours_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers Dinov2 / Dinov2WithRegisters weights (in-memory or legacy names) -> ours."""
    state_dict = {re.sub(r"^dinov2\.", "", k): v for k, v in state_dict.items() if not k.startswith("classifier.")}
    state_dict = rename_keys(state_dict, TRANSFORMERS_LEGACY_RENAMES)
    return rename_keys(fuse_projections(state_dict), TRANSFORMERS_TO_OURS_RENAMES)


def ours_to_transformers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our weights -> transformers' in-memory Dinov2 names (q/k/v and gate/up split)."""
    return split_projections(rename_keys(state_dict, _invert(TRANSFORMERS_TO_OURS_RENAMES)))


# -- configs --------------------------------------------------------------------------------------

# Fields with the same name and meaning in our config and transformers' Dinov2 configs.
SHARED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "use_swiglu_ffn",
    "hidden_act",
    "layer_norm_eps",
    "layerscale_value",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)


def config_from_transformers(config) -> Dinov2HFConfig:
    """Our config for a transformers ``Dinov2Config`` or ``Dinov2WithRegistersConfig``."""
    with_registers = config.model_type == "dinov2_with_registers"
    if config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"Expected a dinov2 or dinov2_with_registers config, got model_type={config.model_type!r}.")
    return Dinov2HFConfig(
        **{name: getattr(config, name) for name in SHARED_CONFIG_FIELDS},
        num_register_tokens=getattr(config, "num_register_tokens", 0) if with_registers else 0,
        # Each stock class hard-codes its resize: exact grid, antialiased for the registers class.
        pos_embed_interpolation="antialias" if with_registers else "transformers",
    )


def config_to_transformers(config: Dinov2HFConfig):
    """The stock transformers config that reproduces ``config``: ``Dinov2Config`` or ``Dinov2WithRegistersConfig``.

    Registers or antialiased interpolation need ``Dinov2WithRegistersModel``; ``"meta"`` interpolation
    has no stock equivalent: outputs then agree at the native resolution only (a warning says so).
    """
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    mlp_ratio = int(config.mlp_ratio) if float(config.mlp_ratio).is_integer() else config.mlp_ratio
    derived = swiglu_hidden_size(config.hidden_size, mlp_ratio) if config.use_swiglu_ffn else int(config.hidden_size * mlp_ratio)
    if derived != config.intermediate_size:
        raise ValueError(
            f"intermediate_size={config.intermediate_size} is not what transformers derives from mlp_ratio={mlp_ratio} "
            f"({derived}); stock transformers Dinov2 cannot express this model."
        )
    if config.pos_embed_interpolation == "meta":
        logger.warning(
            "This model resizes position embeddings Meta's way (offset %s); stock transformers has no such mode, so "
            "the exported model matches it exactly at the native %dpx resolution only.",
            config.interpolate_offset,
            config.image_size,
        )
    common = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    common["mlp_ratio"] = mlp_ratio  # transformers' strict config wants an int where it can be one
    if config.num_register_tokens > 0 or config.pos_embed_interpolation == "antialias":
        return Dinov2WithRegistersConfig(num_register_tokens=config.num_register_tokens, **common)
    return Dinov2Config(**common)


# -- whole models ---------------------------------------------------------------------------------


def from_transformers(model_or_path) -> Dinov2HFModel:
    """Our model from a transformers Dinov2 model, or from a local checkpoint folder of one.

    Folders may hold stock checkpoints such as a local copy of ``facebook/dinov2-base`` (legacy
    on-disk key names included: transformers renames them on load).
    """
    from transformers import Dinov2Model, Dinov2WithRegistersModel, PretrainedConfig

    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; expected a transformers Dinov2 checkpoint folder.")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        classes = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}
        if model_type not in classes:
            raise ValueError(
                f"{path} holds a {model_type!r} model; expected 'dinov2' or 'dinov2_with_registers'. "
                "For our own checkpoints use Dinov2HFModel.from_pretrained."
            )
        model = classes[model_type].from_pretrained(path)
    if isinstance(model, PretrainedConfig):
        raise TypeError("from_transformers needs a model or a checkpoint folder, not a config.")
    base = getattr(model, "dinov2", model)  # Dinov2ForImageClassification holds the model as .dinov2
    ours = Dinov2HFModel(config_from_transformers(base.config))
    state_dict = transformers_to_ours_state_dict(base.state_dict())
    if ours.config.num_register_tokens == 0:
        state_dict.pop("embeddings.register_tokens", None)  # (1, 0, hidden) in a 0-register stock model
    if "embeddings.mask_token" not in state_dict:  # use_mask_token=False checkpoints
        state_dict["embeddings.mask_token"] = torch.zeros_like(ours.embeddings.mask_token)
    ours.load_state_dict(state_dict, strict=True)
    return ours.eval()


def to_transformers(model: Dinov2HFModel):
    """A stock transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel`` with our weights."""
    from transformers import AutoModel

    stock_config = config_to_transformers(model.config)
    stock = AutoModel.from_config(stock_config)
    state_dict = ours_to_transformers_state_dict(model.state_dict())
    if model.config.num_register_tokens == 0 and stock_config.model_type == "dinov2_with_registers":
        # A register-free model with antialiased interpolation exports as the registers class with 0 registers.
        state_dict["embeddings.register_tokens"] = stock.embeddings.register_tokens.detach().clone()
    stock.load_state_dict(state_dict, strict=True)
    return stock.eval()


def export_transformers(model: Dinov2HFModel, output_dir: str | Path, crop_size: int = 224) -> Path:
    """Save ``model`` in stock transformers format with the DINOv2 image processor.

    The folder loads with ``AutoModel.from_pretrained`` and ``pipeline("image-feature-extraction")``
    without ``dinov2_hf`` and without ``trust_remote_code``.
    """
    output_dir = Path(output_dir)
    to_transformers(model).save_pretrained(output_dir)
    _processor(crop_size).save_pretrained(output_dir)
    return output_dir


def save_ours(model: Dinov2HFModel, output_dir: str | Path, crop_size: int = 224) -> Path:
    """Save in our format (safetensors + code for trust_remote_code) with the DINOv2 image processor."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    _processor(crop_size).save_pretrained(output_dir)
    return output_dir


def _processor(crop_size: int):
    """The DINOv2 processor for ``crop_size``, resizing in the released 256:224 proportion."""
    return dinov2_image_processor(crop_size=crop_size)


# -- Meta checkpoints -----------------------------------------------------------------------------


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
    return extract_meta_backbone(checkpoint)


def extract_meta_backbone(checkpoint: Mapping) -> StateDict:
    """The backbone state dict (prefix stripped) inside a Meta checkpoint dictionary."""
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    prefixes = [k[: -len("pos_embed")] for k in checkpoint if k.endswith("pos_embed")]
    if not prefixes:
        raise ValueError("No 'pos_embed' weight found: this does not look like a DINOv2 (Meta) backbone checkpoint.")
    prefix = next((p for p in prefixes if p.startswith("teacher")), sorted(prefixes, key=len)[0])
    return {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix) and torch.is_tensor(v)}


def infer_config_from_meta(
    state_dict: Mapping[str, torch.Tensor], head_dim: int = 64, pos_embed_interpolation: str | None = None
) -> Dinov2HFConfig:
    """Architecture of a Meta backbone from its weights alone.

    Width, depth, patch size, registers, MLP or SwiGLU (and its hidden size) come from tensor
    shapes; the number of heads is ``hidden / head_dim`` (64 in every released model). The
    interpolation defaults to what the released models use: Meta's offset 0.1 without registers,
    antialiasing with registers.
    """
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
    fc_key = next(k for k in state_dict if k.endswith(".mlp.w12.weight" if use_swiglu else ".mlp.fc1.weight"))
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
    """Our model from a Meta DINOv2 checkpoint file or state dict, architecture inferred from the weights."""
    state_dict = load_meta_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else extract_meta_backbone(checkpoint)
    config = infer_config_from_meta(state_dict, head_dim=head_dim, pos_embed_interpolation=pos_embed_interpolation)
    model = Dinov2HFModel(config)
    missing, unexpected = model.load_state_dict(meta_to_ours_state_dict(state_dict, config), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Meta checkpoint does not match the inferred architecture: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return model.eval()
