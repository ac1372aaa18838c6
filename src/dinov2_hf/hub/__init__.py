"""Publishing on the Hugging Face Hub: backbones with model cards, curated datasets with dataset cards."""

from .push import PushResult, push_checkpoint, push_dataset, resolve_token
from .staging import FORMATS, StagedUpload, resolve_source, stage_upload
from .training import ModelCardWriter, PushToHub, hub_callbacks

__all__ = [
    "FORMATS",
    "ModelCardWriter",
    "PushResult",
    "PushToHub",
    "StagedUpload",
    "hub_callbacks",
    "push_checkpoint",
    "push_dataset",
    "resolve_source",
    "resolve_token",
    "stage_upload",
]
