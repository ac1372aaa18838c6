"""The DINOv2 backbone as transformers models, its image processor and checkpoint conversion."""

from .configuration_dinov2_hf import PRESETS, Dinov2HFConfig
from .loading import load_backbone
from .modeling_dinov2_hf import Dinov2HFBackbone, Dinov2HFModel, Dinov2HFModelOutput, Dinov2HFPreTrainedModel
from .processor import dinov2_image_processor, resize_for_crop

__all__ = [
    "PRESETS",
    "Dinov2HFBackbone",
    "Dinov2HFConfig",
    "Dinov2HFModel",
    "Dinov2HFModelOutput",
    "Dinov2HFPreTrainedModel",
    "dinov2_image_processor",
    "load_backbone",
    "resize_for_crop",
]
