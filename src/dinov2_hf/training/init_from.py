"""Continued pretraining from a released backbone: ``model.init_from=SOURCE``.

SOURCE is anything :func:`modeling.loading.load_backbone` reads (a stock transformers Dinov2 folder, legacy
on-disk key names included; a Meta ``.pth``; one of our exports; a Hub id; the ``dinov2_hf/`` folder of a
``dinov2-hf push``). How the recipe relates to it:

- the architecture is the source's: a preset or ``model.overrides`` field that contradicts it is an error
  naming both values, raised from the source's ``config.json`` before the model is built (a ``.pth`` or a Hub
  id carries no readable config: it is loaded first, then checked);
- training-only fields stay the recipe's (:data:`TRAINING_FIELDS`: the native size is the global crop size,
  stochastic depth); init-only ones (LayerScale's initial value) come with the source's weights;
- the position embeddings are resized to the recipe's grid with the model's own interpolation;
- a pushed ``dinov2_hf/`` folder's EMA heads load into student and teacher heads when the recipe's heads
  have their shapes; otherwise the heads start fresh and ``train.freeze_backbone_steps`` (auto: 10% of the
  run) trains them alone first.

:func:`resolve_init` turns the recipe into one with the source's architecture written out in
``model.overrides``: checkpoints then carry a recipe that rebuilds the model without the source
(``read_ema``, distillation teachers, ``dinov2-hf push``). The weights are loaded into a freshly built
model only; a resumed run's checkpoint replaces them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modeling import Dinov2HFConfig, Dinov2HFModel
from ..modeling.configuration_dinov2_hf import PRESETS
from ..modeling.convert_transformers import STOCK_MODEL_TYPES, config_from_transformers
from ..modeling.loading import check_backbone_source, load_backbone
from . import run_dir
from .config import TrainConfig

# Dinov2HFConfig fields that define the weights: taken from the source, a recipe value that differs is an error.
ARCHITECTURE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "intermediate_size", "use_swiglu_ffn",
    "hidden_act", "layer_norm_eps", "patch_size", "num_channels", "qkv_bias", "num_register_tokens",
    "pos_embed_interpolation", "interpolate_offset",
)
# Fields of training or of the backbone's outputs: the recipe's (image_size: the global crop size by default).
TRAINING_FIELDS = (
    "image_size", "drop_path_rate", "drop_path_uniform", "apply_layernorm", "reshape_hidden_states", "out_features",
    "out_indices",
)
# Fields that only set initial weights: the source's weights replace them, so a recipe value is moot.
INIT_ONLY_FIELDS = ("layerscale_value", "initializer_range")
AUTO_FREEZE_FRACTION = 0.1  # train.freeze_backbone_steps=-1 with fresh heads: this share of the run
HEAD_FIELDS = ("head_n_prototypes", "head_bottleneck_dim", "head_hidden_dim", "head_nlayers", "head_mlp_bias")
HEAD_PREFIXES = ("dino_head.", "ibot_head.")  # the keys of heads.safetensors


@dataclass
class InitSource:
    """A resolved ``model.init_from``: the source, its backbone config, its heads file (a published folder's
    ``heads.safetensors``, else None) and, for sources whose architecture is only in their weights, the
    backbone already loaded (else it is loaded by :meth:`backbone`)."""

    source: str
    config: Dinov2HFConfig | None  # None until a source without a readable config.json is loaded
    heads_file: Path | None = None
    loaded: Dinov2HFModel | None = None

    def backbone(self) -> Dinov2HFModel:
        """The source backbone (loaded once), its architecture checked against the config read before."""
        if self.loaded is None:
            with torch.random.fork_rng(devices=[]):  # the heads then start as in a run from scratch
                self.loaded, _ = load_backbone(self.source)
            differences = [] if self.config is None else _differences(self.config, self.loaded.config, ARCHITECTURE_FIELDS)
            if differences:  # a config.json that does not describe its weights
                raise ValueError(f"model.init_from={self.source}: its weights do not match its config.json "
                                 f"({'; '.join(differences)}).")
        return self.loaded


def _differences(a: Dinov2HFConfig, b: Dinov2HFConfig, fields: tuple[str, ...]) -> list[str]:
    return [f"{name} {getattr(a, name)!r} vs {getattr(b, name)!r}" for name in fields if getattr(a, name) != getattr(b, name)]


def read_source_config(source: str) -> Dinov2HFConfig | None:
    """The backbone config of a local folder (ours or stock transformers) from its ``config.json``, without
    reading weights; None for a Meta ``.pth`` or a Hub id (their architecture is known once loaded)."""
    path = Path(source)
    if not path.is_dir():
        return None
    config_file = path / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == Dinov2HFConfig.model_type:
        return Dinov2HFConfig.from_json_file(str(config_file))
    if model_type in STOCK_MODEL_TYPES:
        from transformers import AutoConfig

        return config_from_transformers(AutoConfig.from_pretrained(path))
    raise ValueError(f"model.init_from={source} holds model_type {model_type!r}, not a DINOv2 backbone "
                     f"({Dinov2HFConfig.model_type!r} or one of {', '.join(STOCK_MODEL_TYPES)}).")


def recipe_architecture(config: TrainConfig) -> dict[str, tuple[str, Any]]:
    """The architecture fields the recipe sets, each with the recipe key that sets it: the preset's fields
    (``model.preset=vits14``), then ``model.overrides.<field>=<value>``."""
    model = config.model
    fields = {name: (f"model.preset={model.preset}", value) for name, value in PRESETS[model.preset].items()
              if name in ARCHITECTURE_FIELDS}
    fields.update({name: (f"model.overrides.{name}={value}", value) for name, value in model.overrides.items()
                   if name in ARCHITECTURE_FIELDS})
    return fields


def check_architecture(config: TrainConfig, source: str, source_config: Dinov2HFConfig) -> None:
    """ValueError naming each recipe field that contradicts the source's architecture, and both values."""
    conflicts = [f"{key} sets {name} {value!r}, the source has {getattr(source_config, name)!r}"
                 for name, (key, value) in recipe_architecture(config).items() if getattr(source_config, name) != value]
    if conflicts:
        raise ValueError(
            f"model.init_from={source} does not fit this recipe: {'; '.join(conflicts)}. The architecture comes from "
            "the source: use the recipe made for it (adapt_vits14, adapt_vitb14, adapt_vitl14) or drop the "
            "contradicting model.overrides."
        )


def check_heads(config: TrainConfig, source: str) -> None:
    """ValueError unless a published folder's ``heads.safetensors`` holds DINO heads whose shapes (read from the
    folder's recipe) are the recipe's."""
    from safetensors import safe_open

    from .checkpoint import recipe_differences

    with safe_open(Path(source) / run_dir.HEADS_FILE, framework="pt") as file:
        names = list(file.keys())
    if not names or not all(name.startswith(HEAD_PREFIXES) for name in names):
        raise ValueError(f"model.init_from={source}: its {run_dir.HEADS_FILE} holds no DINO/iBOT heads (a headless "
                         "distillation's projections?); pass a folder without it to start fresh heads.")
    saved = run_dir.read_recipe(source)
    keys = {"objective", "ibot.separate_head", *(f"dino.{name}" for name in HEAD_FIELDS)}
    if saved.ibot.separate_head and config.ibot.separate_head:
        keys.update(f"ibot.{name}" for name in HEAD_FIELDS)
    differences = [d for d in recipe_differences(saved, config, ("objective", "dino", "ibot")) if d.split(":")[0] in keys]
    if differences:
        raise ValueError(
            f"model.init_from={source} carries heads ({run_dir.HEADS_FILE}) of another shape than this recipe's "
            f"(its recipe -> this one: {'; '.join(differences)}). Set these keys to the source's values, or start "
            f"fresh heads from its backbone alone (the repo root, or a folder without {run_dir.HEADS_FILE})."
        )


def resolve_init(config: TrainConfig) -> tuple[TrainConfig, InitSource | None]:
    """``config`` with the source's architecture written into ``model.overrides`` and
    ``train.freeze_backbone_steps`` resolved, and the source; ``(config, None)`` without ``model.init_from``.

    Everything is checked here, before the model is built: the source exists and is a backbone, the recipe does
    not contradict its architecture, a published folder's heads fit the recipe's. Idempotent: a resolved recipe
    resolves to itself."""
    source = config.model.init_from
    if not source:
        return config, None
    if config.distill.teacher:
        raise ValueError("model.init_from starts a self-distillation run from a backbone; with distill.teacher "
                         "the student starts from scratch: drop one of the two.")
    check_backbone_source(source, "model.init_from=")
    init = InitSource(source, read_source_config(source))
    if init.config is None:  # a .pth or a Hub id: the architecture is in the weights
        init.config = init.backbone().config
    check_architecture(config, source, init.config)
    if Path(source).is_dir() and run_dir.is_published(source):
        check_heads(config, source)
        init.heads_file = Path(source) / run_dir.HEADS_FILE
    model, train = config.model, config.train
    overrides = {name: getattr(init.config, name) for name in ARCHITECTURE_FIELDS}
    overrides.update({name: value for name, value in model.overrides.items() if name in TRAINING_FIELDS})
    freeze = train.freeze_backbone_steps
    if freeze == -1:
        freeze = 0 if init.heads_file is not None else max(1, round(AUTO_FREEZE_FRACTION * config.total_steps))
    resolved = dataclasses.replace(
        config,
        model=dataclasses.replace(model, overrides=overrides, layerscale_value=init.config.layerscale_value),
        train=dataclasses.replace(train, freeze_backbone_steps=freeze),
    )
    return resolved, init


def load_init(arch: nn.Module, init: InitSource) -> None:
    """Copy the source into a freshly built objective: its backbone into the student's and the teacher's, the
    position embeddings resized to their grid, and its heads when it carries them (every tensor checked)."""
    source = init.backbone()
    target = arch.student["backbone"].config
    state = source.state_dict()
    grid = target.image_size // target.patch_size
    if source.config.image_size // source.config.patch_size != grid:
        # The model's own resize (pos_embed_interpolation): the student's first forward is the source's at this size.
        with torch.no_grad():
            state["embeddings.position_embeddings"] = source.embeddings.resize_pos_encoding(grid, grid, torch.float32)
    if init.heads_file is not None:
        from safetensors.torch import load_file

        state = {**{f"backbone.{k}": v for k, v in state.items()}, **load_file(init.heads_file)}
        for part in (arch.student, arch.teacher):
            part.load_state_dict(state, strict=True)
    else:
        for part in (arch.student, arch.teacher):
            part["backbone"].load_state_dict(state, strict=True)
    init.loaded = None  # copied: a loaded source (a ViT-g .pth) is not kept for the whole run

