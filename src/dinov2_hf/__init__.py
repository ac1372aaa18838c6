"""dinov2_hf: DINOv2 self-supervised visual pretraining, native to the Hugging Face stack.

Importing the package registers ``Dinov2HFConfig`` (model_type ``dinov2_hf``) with ``AutoConfig``,
``Dinov2HFModel`` with ``AutoModel`` and ``Dinov2HFBackbone`` with ``AutoBackbone``; saved
checkpoints also carry ``auto_map`` and the modeling code, so ``trust_remote_code=True`` loads
them where this package is not installed.
"""

from transformers import AutoBackbone, AutoConfig, AutoModel

from .modeling import (
    PRESETS,
    Dinov2HFBackbone,
    Dinov2HFConfig,
    Dinov2HFModel,
    Dinov2HFModelOutput,
    Dinov2HFPreTrainedModel,
    dinov2_image_processor,
)

__version__ = "0.1.0"

AutoConfig.register(Dinov2HFConfig.model_type, Dinov2HFConfig, exist_ok=True)
AutoModel.register(Dinov2HFConfig, Dinov2HFModel, exist_ok=True)
AutoBackbone.register(Dinov2HFConfig, Dinov2HFBackbone, exist_ok=True)
# Saved checkpoints carry the code and an auto_map for trust_remote_code loading.
Dinov2HFConfig.register_for_auto_class()
Dinov2HFModel.register_for_auto_class("AutoModel")
Dinov2HFBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "PRESETS",
    "Dinov2HFBackbone",
    "Dinov2HFConfig",
    "Dinov2HFModel",
    "Dinov2HFModelOutput",
    "Dinov2HFPreTrainedModel",
    "dinov2_image_processor",
]
