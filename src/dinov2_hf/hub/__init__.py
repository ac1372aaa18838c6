"""Publishing on the Hugging Face Hub: backbones with model cards, curated datasets with dataset cards."""

from .push import PushResult, push_checkpoint, push_dataset, resolve_token
from .staging import FORMATS, StagedUpload, resolve_source, stage_upload

__all__ = ["FORMATS", "PushResult", "StagedUpload", "push_checkpoint", "push_dataset", "resolve_source", "resolve_token", "stage_upload"]
