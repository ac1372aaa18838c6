"""Configuration of the DINOv2 objective: model, heads, losses, crops, masking, optimisation.

Field names follow the official ``ssl_default_config.yaml`` sections (``dino``, ``ibot``, ``crops``,
``optim``/``teacher`` merged into ``schedule``) so official settings translate one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config_utils import apply_overrides, from_dict, load_yaml
from ..data.transforms import MultiCropSettings
from ..modeling.configuration_dinov2_hf import check_overrides, check_preset
from .schedules import ScheduleSettings


@dataclass
class ModelSettings:
    """Student architecture: a preset name plus any ``Dinov2HFConfig`` field as an override
    (a name that is not one fails at load, with the valid ones).

    ``init_from``: continued pretraining. Student and teacher backbones start from this backbone (anything
    ``modeling.loading.load_backbone`` reads: a stock transformers Dinov2 folder, a Meta .pth, one of our
    exports, a Hub id, a pushed ``dinov2_hf/`` folder, whose heads then load too). Its architecture is the
    model's: a preset or override that contradicts it is an error (see ``training.init_from``).
    """

    preset: str = "vits14"
    drop_path_rate: float = 0.3
    layerscale_value: float = 1e-5
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""

    def __post_init__(self) -> None:
        check_preset(self.preset)
        check_overrides(self.overrides, "model.overrides")


@dataclass
class HeadSettings:
    """A DINO / iBOT projection head (keys named as in the official configs)."""

    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    head_mlp_bias: bool = True


@dataclass
class DinoSettings(HeadSettings):
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1


@dataclass
class IbotSettings(HeadSettings):
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False


@dataclass
class SimDinoSettings:
    """``objective=simdino`` (Wu et al., 2025): coding-rate ``eps`` and the expansion term's weight."""

    coding_rate_eps: float = 0.05
    expansion_weight: float = 1.0


@dataclass
class OptimSettings:
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class SSLConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    dino: DinoSettings = field(default_factory=DinoSettings)
    ibot: IbotSettings = field(default_factory=IbotSettings)
    crops: MultiCropSettings = field(default_factory=MultiCropSettings)
    # dino: the official DINO + iBOT cross-entropies over prototypes; simdino: SimDINO's feature alignment
    # with a coding-rate term (no prototypes, centering or teacher temperature; see losses/simdino_loss.py)
    objective: Literal["dino", "simdino"] = "dino"
    simdino: SimDinoSettings = field(default_factory=SimDinoSettings)
    centering: Literal["softmax_center", "sinkhorn_knopp"] = "softmax_center"
    student_temp: float = 0.1
    center_momentum: float = 0.9
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)

    def __post_init__(self) -> None:
        if self.ibot.loss_weight > 0 and not (0 < self.ibot.mask_sample_probability <= 1):
            raise ValueError("ibot.mask_sample_probability must be in (0, 1] when the iBOT loss is on.")
        low, high = self.ibot.mask_ratio_min_max
        if not 0 <= low <= high <= 1:
            raise ValueError(f"ibot.mask_ratio_min_max={self.ibot.mask_ratio_min_max} must satisfy 0 <= min <= max <= 1.")


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None, config_class: type = None):
    """A config from a recipe shipped in the package (by name) or a YAML file, with ``a.b=value``
    overrides. Unknown keys or wrong types fail here, before any work, naming the key."""
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) not in available_recipes():
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a YAML file nor a recipe; recipes: {', '.join(available_recipes())}."
            )
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(config_class or SSLConfig, data)
