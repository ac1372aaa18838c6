"""Saving a backbone as a checkpoint folder: the weights plus the DINOv2 image processor.

Two formats: ours (safetensors + the modeling code, loaded with ``trust_remote_code=True``) and stock
transformers (``Dinov2Model`` / ``Dinov2WithRegistersModel``, loaded without ``dinov2_hf``).
"""

from __future__ import annotations

from pathlib import Path

from .convert_transformers import to_transformers
from .modeling_dinov2_hf import Dinov2HFModel
from .processor import dinov2_image_processor


def export_transformers(model: Dinov2HFModel, output_dir: str | Path, crop_size: int = 224) -> Path:
    """Save ``model`` in stock transformers format with the DINOv2 image processor.

    The folder loads with ``AutoModel.from_pretrained`` and ``pipeline("image-feature-extraction")``
    without ``dinov2_hf`` and without ``trust_remote_code``.
    """
    output_dir = Path(output_dir)
    to_transformers(model).save_pretrained(output_dir)
    dinov2_image_processor(crop_size=crop_size).save_pretrained(output_dir)
    return output_dir


def save_ours(model: Dinov2HFModel, output_dir: str | Path, crop_size: int = 224) -> Path:
    """Save in our format (safetensors + code for trust_remote_code) with the DINOv2 image processor."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    dinov2_image_processor(crop_size=crop_size).save_pretrained(output_dir)
    return output_dir
