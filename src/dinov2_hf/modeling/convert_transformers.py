"""Conversion between our model and transformers' stock ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

Weights are renamed key by key (regular expressions, :func:`rename_keys`) with two fusions:
transformers keeps separate q/k/v and gate/up projections, we (like Meta) keep them fused as
``qkv`` and ``w12``. Everything is exact: weights are copied, never recomputed. transformers itself
renames the legacy key names of older on-disk checkpoints (``attention.attention.query``,
``mlp.weights_in``, ...) when it loads them, so only its in-memory names are mapped here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_dinov2_hf import Dinov2HFConfig, swiglu_hidden_size
from .modeling_dinov2_hf import Dinov2HFModel
from .strict import from_pretrained_strict

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# transformers' in-memory names -> ours (after q/k/v and gate/up have been fused).
STOCK_MODEL_TYPES = ("dinov2", "dinov2_with_registers")  # the stock transformers models we convert

TRANSFORMERS_TO_OURS_RENAMES = [
    (r"\.attention\.o_proj\.", ".attention.proj."),
    (r"\.mlp\.down_proj\.", ".mlp.w3."),
]
# Fusions: (our fused name, the separate transformers names in concatenation order).
FUSED_PROJECTIONS = [
    ("attention.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    ("mlp.w12", ("mlp.gate_proj", "mlp.up_proj")),
]


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
    """transformers Dinov2 / Dinov2WithRegisters weights (in-memory names) -> ours; an image classifier's
    ``dinov2.`` prefix and ``classifier`` head are dropped."""
    state_dict = {re.sub(r"^dinov2\.", "", k): v for k, v in state_dict.items() if not k.startswith("classifier.")}
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
    if config.model_type not in STOCK_MODEL_TYPES:
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
    on-disk key names included: transformers renames them on load). Missing or unexpected weights in a
    folder raise ValueError; only an image classifier's ``classifier`` head is dropped.
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
        # An image classifier's head is the one thing we drop on purpose (as transformers_to_ours_state_dict does).
        model = from_pretrained_strict(classes[model_type], path, ignore_unexpected=r"^classifier\.")
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
