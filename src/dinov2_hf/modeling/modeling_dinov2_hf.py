"""The DINOv2 vision transformer (Oquab et al., 2023) as a transformers ``PreTrainedModel``.

One readable file in the transformers style. It is self-contained (it imports only torch,
transformers and its configuration file) because it is copied next to every saved checkpoint so
that ``trust_remote_code=True`` loading works without ``dinov2_hf`` installed.

Layout of the weights (conversion to transformers' and Meta's layouts is a rename table in
``dinov2_hf.modeling.convert_transformers`` and ``convert_meta``)::

    embeddings.{cls_token, mask_token, register_tokens, position_embeddings}
    embeddings.patch_embeddings.projection.{weight, bias}
    encoder.layer.{i}.norm1 / .attention.qkv / .attention.proj / .layer_scale1.lambda1
    encoder.layer.{i}.norm2 / .mlp.{fc1, fc2} or .mlp.{w12, w3} / .layer_scale2.lambda1
    layernorm

Token packing: every block works on a flat ``(tokens, hidden)`` tensor that may hold several
batches of different resolutions (e.g. 2 global + 8 local crops of DINOv2 training). The linear
layers, norms and feed-forward run once over all tokens; attention runs once per resolution
group, each image attending only to its own tokens (block-diagonal attention), through
transformers' attention interface. This is exact, trains on CPU and CUDA, and works with every
attention backend. A plain forward is the one-group case of the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dinov2_hf import Dinov2HFConfig

# (batch size, sequence length) of each resolution group in a packed token tensor.
TokenGroups = tuple[tuple[int, int], ...]

# Written into every saved config, so that each Auto class finds the code shipped with the checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_dinov2_hf.Dinov2HFConfig",
    "AutoModel": "modeling_dinov2_hf.Dinov2HFModel",
    "AutoBackbone": "modeling_dinov2_hf.Dinov2HFBackbone",
}


@dataclass
class Dinov2HFModelOutput(BaseModelOutputWithPooling):
    """Outputs of [`Dinov2HFModel`].

    Args:
        last_hidden_state: ``(batch, 1 + registers + patches, hidden)`` after the final LayerNorm.
        pooler_output: ``(batch, hidden)`` normalized CLS token.
        prenorm_hidden_state: ``(batch, 1 + registers + patches, hidden)`` before the final LayerNorm.
        hidden_states: embeddings output and every block's output (when requested).
        attentions: attention probabilities of every block (when requested).
    """

    prenorm_hidden_state: torch.FloatTensor | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q k^T * scaling) v. Returns (batch, seq, heads, head_dim) and the weights."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class Dinov2HFPatchEmbeddings(nn.Module):
    """Non-overlapping ``patch_size`` patches projected to ``hidden_size`` by a strided convolution."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)


class Dinov2HFEmbeddings(nn.Module):
    """Patch embeddings, iBOT mask token, CLS token, position embeddings and register tokens."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.patch_embeddings = Dinov2HFPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens > 0
            else None
        )

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (CLS first) for a ``grid_height x grid_width`` patch grid.

        The resize follows ``config.pos_embed_interpolation`` so that outputs match the
        implementation a checkpoint came from exactly (see [`Dinov2HFConfig`]). It runs in float32.
        """
        pos_embed = self.position_embeddings
        num_positions = pos_embed.shape[1] - 1
        # Same shortcut as Meta's and transformers' code: the native square grid is used as is.
        if grid_height * grid_width == num_positions and grid_height == grid_width and not torch.jit.is_tracing():
            return pos_embed.to(dtype)
        return self.resize_pos_encoding(grid_height, grid_width, dtype)

    def resize_pos_encoding(self, grid_height, grid_width, dtype: torch.dtype, meta_resize=None) -> torch.Tensor:
        """The resize of :meth:`interpolate_pos_encoding` without its native-grid shortcut.

        ``meta_resize(patch_pos_embed, grid_height, grid_width, offset)`` replaces Meta's scale-factor
        resize (the ONNX export passes one whose scale is computed in the graph).
        """
        pos_embed = self.position_embeddings
        native = int(round((pos_embed.shape[1] - 1) ** 0.5))
        class_pos_embed = pos_embed[:, :1].float()
        patch_pos_embed = pos_embed[:, 1:].float().reshape(1, native, native, -1).permute(0, 3, 1, 2)
        mode = self.config.pos_embed_interpolation
        if mode == "meta" and meta_resize is not None:
            patch_pos_embed = meta_resize(patch_pos_embed, grid_height, grid_width, self.config.interpolate_offset)
        elif mode == "meta":
            offset = self.config.interpolate_offset
            scale = ((grid_height + offset) / native, (grid_width + offset) / native)
            patch_pos_embed = F.interpolate(patch_pos_embed, scale_factor=scale, mode="bicubic")
        else:
            patch_pos_embed = F.interpolate(
                patch_pos_embed,
                size=(grid_height, grid_width),
                mode="bicubic",
                align_corners=False,
                antialias=mode == "antialias",
            )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, -1)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1).to(dtype)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            embeddings = torch.where(
                bool_masked_pos.unsqueeze(-1), self.mask_token.to(embeddings.dtype).unsqueeze(0), embeddings
            )
        embeddings = torch.cat((self.cls_token.expand(batch_size, -1, -1).to(embeddings.dtype), embeddings), dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(
            height // self.patch_size, width // self.patch_size, embeddings.dtype
        )
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch_size, -1, -1).to(embeddings.dtype)
            embeddings = torch.cat((embeddings[:, :1], registers, embeddings[:, 1:]), dim=1)
        return embeddings


class Dinov2HFAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, run per resolution group."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        # transformers' sdpa integration treats modules without this flag as causal.
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, groups: TokenGroups, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        qkv = self.qkv(hidden_states)
        outputs, weights, start = [], [], 0
        for batch_size, seq_len in groups:
            end = start + batch_size * seq_len
            query, key, value = (
                qkv[start:end].view(batch_size, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            )
            attn_output, attn_weights = attention_interface(
                self, query, key, value, None, scaling=self.scaling, dropout=0.0
            )
            outputs.append(attn_output.reshape(batch_size * seq_len, -1))
            weights.append(attn_weights)
            start = end
        attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return self.proj(attn_output), (tuple(weights) if output_attentions else None)


class Dinov2HFLayerScale(nn.Module):
    """Per-channel learned scaling of a residual branch."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), config.layerscale_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class Dinov2HFMLP(nn.Module):
    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.exact_gelu = config.hidden_act == "gelu"
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.exact_gelu and not torch.is_grad_enabled():
            # Inference: nothing keeps the pre-activation, so GELU in place saves a (tokens, 4 * hidden)
            # allocation and a memory pass (~6% of the MLP on CPU).
            hidden_states = torch.ops.aten.gelu_(hidden_states)
        else:
            hidden_states = self.activation(hidden_states)
        return self.fc2(hidden_states)


class Dinov2HFSwiGLUFFN(nn.Module):
    """SwiGLU feed-forward with fused gate and up projections (``w12``), as Meta's ViT-g."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        self.w12 = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(hidden_states).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


def add_residual_stochastic_depth(
    hidden_states: torch.Tensor,
    groups: TokenGroups,
    branch: Callable[[torch.Tensor, TokenGroups], torch.Tensor],
    drop_rate: float,
) -> torch.Tensor:
    """``x + branch(x)`` where, per group, the branch runs only on a random subset of the images.

    Efficient stochastic depth (DINOv2): each group keeps ``max(int(b * (1 - drop_rate)), 1)`` of
    its ``b`` images, the branch runs on those only (so compute really drops) and its output is
    added back scaled by ``b / kept``, which keeps the expectation equal to ``x + branch(x)``.
    """
    device = hidden_states.device
    token_indices, kept_groups, scales, start = [], [], [], 0
    for batch_size, seq_len in groups:
        kept = max(int(batch_size * (1 - drop_rate)), 1)
        rows = torch.randperm(batch_size, device=device)[:kept]
        token_indices.append((start + rows[:, None] * seq_len + torch.arange(seq_len, device=device)).flatten())
        kept_groups.append((kept, seq_len))
        scales.append(torch.full((kept * seq_len, 1), batch_size / kept, device=device))
        start += batch_size * seq_len
    index = torch.cat(token_indices)
    residual = branch(hidden_states[index], tuple(kept_groups)).to(hidden_states.dtype)
    return hidden_states.index_add(0, index, residual * torch.cat(scales).to(hidden_states.dtype))


class Dinov2HFLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, config: Dinov2HFConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2HFAttention(config)
        self.layer_scale1 = Dinov2HFLayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2HFSwiGLUFFN(config) if config.use_swiglu_ffn else Dinov2HFMLP(config)
        self.layer_scale2 = Dinov2HFLayerScale(config)
        self.drop_path_rate = drop_path_rate

    def _attention_branch(self, hidden_states: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
        return self.layer_scale1(self.attention(self.norm1(hidden_states), groups)[0])

    def _mlp_branch(self, hidden_states: torch.Tensor, groups: TokenGroups) -> torch.Tensor:
        return self.layer_scale2(self.mlp(self.norm2(hidden_states)))

    def forward(
        self, hidden_states: torch.Tensor, groups: TokenGroups, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        if self.training and self.drop_path_rate > 0.0:
            hidden_states = add_residual_stochastic_depth(
                hidden_states, groups, self._attention_branch, self.drop_path_rate
            )
            hidden_states = add_residual_stochastic_depth(hidden_states, groups, self._mlp_branch, self.drop_path_rate)
            return hidden_states, None
        attn_output, attn_weights = self.attention(self.norm1(hidden_states), groups, output_attentions)
        # x + h * lambda in one fused kernel (one memory pass instead of two).
        hidden_states = torch.addcmul(hidden_states, attn_output, self.layer_scale1.lambda1)
        mlp_output = self.mlp(self.norm2(hidden_states))
        hidden_states = torch.addcmul(hidden_states, mlp_output, self.layer_scale2.lambda1)
        return hidden_states, attn_weights


class Dinov2HFEncoder(nn.Module):
    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__()
        if config.drop_path_uniform:
            rates = [config.drop_path_rate] * config.num_hidden_layers
        else:
            rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.layer = nn.ModuleList([Dinov2HFLayer(config, rate) for rate in rates])


@dataclass
class PackedEncoding:
    """Encoder outputs of a packed forward, flat over all groups (internal)."""

    groups: TokenGroups
    prenorm: torch.Tensor
    normed: torch.Tensor
    hidden_states: list[torch.Tensor] | None
    attentions: list[tuple[torch.Tensor, ...]] | None

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(tokens, hidden) -> one (batch, seq, hidden) view per group."""
        views, start = [], 0
        for batch_size, seq_len in self.groups:
            views.append(flat[start : start + batch_size * seq_len].view(batch_size, seq_len, -1))
            start += batch_size * seq_len
        return views


class Dinov2HFPreTrainedModel(PreTrainedModel):
    config_class = Dinov2HFConfig
    config: Dinov2HFConfig
    base_model_prefix = "dinov2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Dinov2HFEmbeddings", "Dinov2HFLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """DINOv2's initialisation: trunc-normal linears, tiny CLS/register init, zero mask token."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default, which Meta's code keeps for the patch embedding.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Dinov2HFEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.normal_(module.cls_token, std=1e-6)
            init.zeros_(module.mask_token)
            if module.register_tokens is not None:
                init.normal_(module.register_tokens, std=1e-6)
        elif isinstance(module, Dinov2HFLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, with an ``auto_map`` naming all our Auto classes."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -- shared by the model and the backbone -------------------------------------------------

    def _output_flags(self, output_hidden_states, output_attentions, return_dict) -> tuple[bool, bool, bool]:
        """Call arguments, or the config's defaults where they are None."""
        pick = lambda value, default: bool(default if value is None else value)  # noqa: E731
        return (
            pick(output_hidden_states, self.config.output_hidden_states),
            pick(output_attentions, self.config.output_attentions),
            pick(return_dict, self.config.return_dict),
        )

    def _check_inputs(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor | None:
        """Validate one batch before any compute; returns the mask as (batch, patches) bool."""
        config = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}.")
        batch_size, channels, height, width = pixel_values.shape
        if channels != config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects {config.num_channels}; "
                "convert images to RGB (e.g. PIL's image.convert('RGB')) or set num_channels in the config."
            )
        patch = config.patch_size
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(
                f"Image size {height}x{width} is not a positive multiple of the patch size {patch}; "
                f"resize or crop to a multiple of {patch} (e.g. {patch * (max(height, patch) // patch)})."
            )
        if bool_masked_pos is None:
            return None
        num_patches = (height // patch) * (width // patch)
        if bool_masked_pos.shape in ((batch_size, num_patches), (batch_size, height // patch, width // patch)):
            return bool_masked_pos.reshape(batch_size, num_patches).bool()
        raise ValueError(
            f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)} but images of size {height}x{width} "
            f"need ({batch_size}, {num_patches}) (one flag per patch, row-major)."
        )

    def _encode(
        self,
        pixel_values: Sequence[torch.Tensor],
        bool_masked_pos: Sequence[torch.Tensor | None],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> PackedEncoding:
        """Embed each batch, pack all tokens, run the blocks and the final LayerNorm once."""
        masks = [self._check_inputs(x, m) for x, m in zip(pixel_values, bool_masked_pos)]
        embedded = [self.embeddings(x, m) for x, m in zip(pixel_values, masks)]
        groups = tuple((e.shape[0], e.shape[1]) for e in embedded)
        flat = [e.reshape(-1, e.shape[-1]) for e in embedded]
        hidden_states = flat[0] if len(flat) == 1 else torch.cat(flat)
        del embedded, flat  # do not hold the embeddings through the whole encoder
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.encoder.layer:
            hidden_states, attn_weights = layer(hidden_states, groups, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(attn_weights)
        return PackedEncoding(groups, hidden_states, self.layernorm(hidden_states), all_hidden, all_attentions)


class Dinov2HFModel(Dinov2HFPreTrainedModel):
    """The DINOv2 ViT. ``forward`` takes one batch; ``forward_packed`` several resolutions at once."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__(config)
        self.embeddings = Dinov2HFEmbeddings(config)
        self.encoder = Dinov2HFEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _outputs(self, encoding: PackedEncoding, return_dict: bool) -> list[Dinov2HFModelOutput | tuple]:
        prenorm, normed = encoding.split(encoding.prenorm), encoding.split(encoding.normed)
        hidden = [encoding.split(h) for h in encoding.hidden_states] if encoding.hidden_states else None
        results = []
        for index, (group_prenorm, group_normed) in enumerate(zip(prenorm, normed)):
            output = Dinov2HFModelOutput(
                last_hidden_state=group_normed,
                pooler_output=group_normed[:, 0],
                hidden_states=tuple(h[index] for h in hidden) if hidden else None,
                attentions=tuple(a[index] for a in encoding.attentions) if encoding.attentions else None,
                prenorm_hidden_state=group_prenorm,
            )
            results.append(output if return_dict else output.to_tuple())
        return results

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Dinov2HFModelOutput | tuple:
        r"""Encode a batch of images.

        Args:
            pixel_values: ``(batch, channels, height, width)``; height and width multiples of the patch size.
            bool_masked_pos: ``(batch, num_patches)`` booleans; masked patches are replaced by the
                learned mask token (iBOT).
            output_hidden_states: also return the embeddings and every block's output.
            output_attentions: also return attention probabilities (computed with eager attention).
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(output_hidden_states, output_attentions, return_dict)
        encoding = self._encode([pixel_values], [bool_masked_pos], output_hidden_states, output_attentions)
        return self._outputs(encoding, return_dict)[0]

    def forward_packed(
        self,
        pixel_values: Sequence[torch.Tensor],
        bool_masked_pos: Sequence[torch.Tensor | None] | None = None,
        output_hidden_states: bool = False,
    ) -> list[Dinov2HFModelOutput]:
        """Encode several batches of different resolutions in one packed pass.

        Gives the same outputs and gradients as calling ``forward`` on each batch, with one launch
        of every linear layer and norm over all tokens (e.g. 2 global + 8 local crops in training).
        """
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = [pixel_values]
        if bool_masked_pos is None:
            bool_masked_pos = [None] * len(pixel_values)
        if len(bool_masked_pos) != len(pixel_values):
            raise ValueError(
                f"forward_packed got {len(pixel_values)} image batches but {len(bool_masked_pos)} masks; "
                "pass one mask (or None) per batch."
            )
        encoding = self._encode(list(pixel_values), list(bool_masked_pos), output_hidden_states)
        return self._outputs(encoding, return_dict=True)

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last ``n`` blocks (or of the block indices in ``n``), as Meta's method.

        Register tokens are dropped. ``reshape`` returns ``(batch, hidden, h, w)`` maps;
        ``return_class_token`` returns ``(patches, cls)`` pairs; ``norm`` applies the final LayerNorm.
        """
        num_layers = self.config.num_hidden_layers
        indices = list(range(num_layers - n, num_layers)) if isinstance(n, int) else list(n)
        if any(not -num_layers <= i < num_layers for i in indices):
            raise ValueError(f"Block indices {indices} out of range for a model with {num_layers} blocks.")
        encoding = self._encode([pixel_values], [None], output_hidden_states=True)
        # hidden_states[0] is the embeddings output, hidden_states[i + 1] is block i's output.
        outputs = [encoding.hidden_states[(i % num_layers) + 1] for i in indices]
        if norm:
            outputs = [self.layernorm(out) for out in outputs]
        batch_size, _, height, width = pixel_values.shape
        outputs = [out.view(batch_size, -1, out.shape[-1]) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.config.num_register_tokens :] for out in outputs]
        if reshape:
            grid = (height // self.config.patch_size, width // self.config.patch_size)
            outputs = [out.reshape(batch_size, *grid, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)


class Dinov2HFBackbone(BackboneMixin, Dinov2HFPreTrainedModel):
    """Multi-stage feature maps for dense tasks (``out_features`` among ``stem``, ``stage1``, ...)."""

    def __init__(self, config: Dinov2HFConfig) -> None:
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = Dinov2HFEmbeddings(config)
        self.encoder = Dinov2HFEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        output_hidden_states, output_attentions, return_dict = self._output_flags(output_hidden_states, output_attentions, return_dict)
        encoding = self._encode([pixel_values], [None], output_hidden_states=True, output_attentions=output_attentions)
        batch_size, _, height, width = pixel_values.shape
        hidden_states = tuple(h.view(batch_size, -1, h.shape[-1]) for h in encoding.hidden_states)
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        feature_maps = []
        for stage, hidden_state in zip(self.stage_names, hidden_states):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                hidden_state = self.layernorm(hidden_state)
            if self.config.reshape_hidden_states:
                patches = hidden_state[:, 1 + self.config.num_register_tokens :]
                hidden_state = patches.reshape(batch_size, *grid, -1).permute(0, 3, 1, 2).contiguous()
            feature_maps.append(hidden_state)
        attentions = tuple(a[0] for a in encoding.attentions) if output_attentions else None
        output = BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["Dinov2HFModel", "Dinov2HFBackbone", "Dinov2HFPreTrainedModel", "Dinov2HFModelOutput"]
