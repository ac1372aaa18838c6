"""The DINOv2 self-supervised objective: heads, meta-architecture, schedules, parameter groups."""

from .config import DinoSettings, IbotSettings, ModelSettings, OptimSettings, SSLConfig
from .heads import DINOHead
from .meta_arch import SSLMetaArch, build_student_config
from .param_groups import apply_schedules, param_groups
from .schedules import CosineScheduler, ScheduleSettings, build_schedules

__all__ = [
    "CosineScheduler",
    "DINOHead",
    "DinoSettings",
    "IbotSettings",
    "ModelSettings",
    "OptimSettings",
    "SSLConfig",
    "SSLMetaArch",
    "ScheduleSettings",
    "apply_schedules",
    "build_schedules",
    "build_student_config",
    "param_groups",
]
