"""Configuration of the DINOv2 vision transformer (``model_type="dinov2_hf"``).

This file is self-contained (it imports only ``transformers`` and the standard library) because it is copied next to every
saved checkpoint, so that ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` works in a
process that does not have ``dinov2_hf`` installed.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# Architecture presets of the released DINOv2 models (Oquab et al., 2023, Table 15).
# ViT-g uses a SwiGLU feed-forward whose hidden size (4096) follows the official rounding rule
# ``(int(hidden_size * mlp_ratio * 2 / 3) + 7) // 8 * 8``.
PRESETS: dict[str, dict[str, Any]] = {
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
    # For tests and CPU smoke runs: four blocks of width 64.
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=56, patch_size=14),
}

POS_EMBED_INTERPOLATIONS = ("transformers", "antialias", "meta")


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """Hidden width of the official SwiGLU feed-forward (two thirds of the MLP width, multiple of 8)."""
    return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def check_preset(name: str) -> None:
    """Fail unless ``name`` is one of :data:`PRESETS` (configs call it when they are loaded)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")


class Dinov2HFConfig(BackboneConfigMixin, PretrainedConfig):
    r"""Configuration of [`Dinov2HFModel`] and [`Dinov2HFBackbone`].

    Args:
        hidden_size: Width of the token embeddings.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Number of attention heads (head dimension = hidden_size / heads).
        mlp_ratio: Feed-forward width as a multiple of ``hidden_size``.
        intermediate_size: Feed-forward hidden width. ``None`` derives it from ``mlp_ratio``
            (for SwiGLU with the official two-thirds rounding rule).
        use_swiglu_ffn: SwiGLU feed-forward (ViT-g) instead of a GELU MLP.
        hidden_act: Activation of the MLP feed-forward.
        layer_norm_eps: LayerNorm epsilon (1e-6 in DINOv2).
        layerscale_value: Initial LayerScale value (1e-5 in DINOv2 training).
        image_size: Native input resolution; the position embeddings cover
            ``(image_size // patch_size) ** 2`` patches and are interpolated for other sizes.
        patch_size: Side of the square patches.
        num_channels: Input channels.
        qkv_bias: Whether the fused query/key/value projection has a bias.
        num_register_tokens: Register tokens (Darcet et al., 2024), inserted after the CLS token
            once position embeddings have been added, so they carry none.
        pos_embed_interpolation: How position embeddings are resized to another patch grid:
            ``"transformers"`` (bicubic to the exact grid, as transformers' ``Dinov2Model``),
            ``"antialias"`` (bicubic with antialiasing to the exact grid, as Meta's register models
            and transformers' ``Dinov2WithRegistersModel``) or ``"meta"`` (bicubic with scale factor
            ``(grid + interpolate_offset) / native_grid``, as Meta's original models).
            ``None`` picks ``"antialias"`` with registers and ``"transformers"`` without.
        interpolate_offset: Offset of the ``"meta"`` mode (0.1 in Meta's released models).
        drop_path_rate: Stochastic depth rate, applied as efficient stochastic depth in training.
        drop_path_uniform: Same rate in every block (DINOv2) instead of a linear ramp from 0.
        initializer_range: Standard deviation of the truncated normal weight init.
        apply_layernorm: Backbone only: apply the final LayerNorm to the feature maps.
        reshape_hidden_states: Backbone only: return feature maps as (batch, channels, height, width).
        out_features / out_indices: Backbone only: which stages (``"stem"``, ``"stage1"``, ...) to return.
    """

    model_type = "dinov2_hf"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        intermediate_size: int | None = None,
        use_swiglu_ffn: bool = False,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        layerscale_value: float = 1e-5,
        image_size: int = 518,
        patch_size: int = 14,
        num_channels: int = 3,
        qkv_bias: bool = True,
        num_register_tokens: int = 0,
        pos_embed_interpolation: str | None = None,
        interpolate_offset: float = 0.1,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        initializer_range: float = 0.02,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
            )
        if pos_embed_interpolation is None:
            pos_embed_interpolation = "antialias" if num_register_tokens > 0 else "transformers"
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"pos_embed_interpolation={pos_embed_interpolation!r} is not one of {POS_EMBED_INTERPOLATIONS}."
            )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        if intermediate_size is None:
            intermediate_size = (
                swiglu_hidden_size(hidden_size, mlp_ratio) if use_swiglu_ffn else int(hidden_size * mlp_ratio)
            )
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.intermediate_size = intermediate_size
        self.use_swiglu_ffn = use_swiglu_ffn
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layerscale_value = layerscale_value
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.num_register_tokens = num_register_tokens
        self.pos_embed_interpolation = pos_embed_interpolation
        self.interpolate_offset = interpolate_offset
        self.drop_path_rate = drop_path_rate
        self.drop_path_uniform = drop_path_uniform
        self.initializer_range = initializer_range
        self.apply_layernorm = apply_layernorm
        self.reshape_hidden_states = reshape_hidden_states
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, num_hidden_layers + 1)]
        super().__init__(**kwargs)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Dinov2HFConfig:
        """Config of a named architecture: ``vits14``, ``vitb14``, ``vitl14``, ``vitg14`` or ``tiny``.

        Keyword arguments override preset fields, e.g.
        ``Dinov2HFConfig.from_preset("vitl14", num_register_tokens=4)``.
        """
        check_preset(name)
        return cls(**{**PRESETS[name], **overrides})

    @property
    def num_patches(self) -> int:
        """Patches covered by the learned position embeddings (the native grid)."""
        return (self.image_size // self.patch_size) ** 2


def config_fields() -> list[str]:
    """The fields a preset override may set: the named parameters of :class:`Dinov2HFConfig`."""
    parameters = inspect.signature(Dinov2HFConfig.__init__).parameters.values()
    return sorted(p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD)


def check_overrides(overrides: dict[str, Any], key: str) -> None:
    """Fail unless every key of ``overrides`` is a :func:`config_fields` name; ``key`` names the setting.

    ``Dinov2HFConfig`` keeps unknown keyword arguments as attributes (``PretrainedConfig``), so a misspelt
    override such as ``num_hiden_layers`` would otherwise build the preset's model without a word.
    """
    if not isinstance(overrides, dict):
        raise ValueError(f"{key} must be a mapping of config fields to values, e.g. {{num_hidden_layers: 6}}; got {overrides!r}.")
    fields = config_fields()
    unknown = sorted(str(name) for name in overrides if name not in fields)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, fields, n=1)
            hints.append(f"{key}.{name}" + (f" (did you mean {key}.{close[0]}?)" if close else ""))
        raise ValueError(f"Unknown model field(s): {', '.join(hints)}. Valid fields of {key}: {', '.join(fields)}.")


__all__ = ["Dinov2HFConfig", "PRESETS", "swiglu_hidden_size"]
