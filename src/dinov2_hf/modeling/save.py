"""Saving a backbone as a checkpoint folder: the weights plus the DINOv2 image processor.

Two formats: ours (safetensors + the modeling code, loaded with ``trust_remote_code=True``) and stock
transformers (``Dinov2Model`` / ``Dinov2WithRegistersModel``, loaded without ``dinov2_hf``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .convert_transformers import to_transformers
from .modeling_dinov2_hf import Dinov2HFModel
from .processor import dinov2_image_processor


def check_output_dir(output_dir: str | Path) -> Path:
    """``output_dir`` as a Path, or ValueError when it cannot become a folder: it, or the nearest of its parents
    that exists, is a file. Cheap, so commands call it before loading any weights (transformers' save_pretrained
    only logs an error and returns when the folder is a file; below a file, mkdir raises NotADirectoryError)."""
    output_dir = Path(output_dir)
    for path in (output_dir, *output_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == output_dir else f"is under {path}, which is a file"
                raise ValueError(f"output folder {output_dir} {where}: pass a folder path.")
            break
    return output_dir


def export_transformers(
    model: Dinov2HFModel, output_dir: str | Path, crop_size: int = 224, image_processor=None, dtype: torch.dtype | None = None
) -> Path:
    """Save ``model`` in stock transformers format with the DINOv2 image processor.

    The folder loads with ``AutoModel.from_pretrained`` and ``pipeline("image-feature-extraction")``
    without ``dinov2_hf`` and without ``trust_remote_code``. ``image_processor``: saved instead of the
    DINOv2 processor for ``crop_size`` (e.g. the source folder's own, to keep its preprocessing). ``dtype``: the
    stored weights' dtype (default: the model's), e.g. ``torch.float16`` for half the size of a small fixture.
    """
    output_dir = check_output_dir(output_dir)
    stock = to_transformers(model)
    (stock if dtype is None else stock.to(dtype)).save_pretrained(output_dir)
    if image_processor is None:
        image_processor = dinov2_image_processor(crop_size=crop_size)
    image_processor.save_pretrained(output_dir)
    return output_dir


def save_ours(model: Dinov2HFModel, output_dir: str | Path, crop_size: int = 224) -> Path:
    """Save in our format (safetensors + code for trust_remote_code) with the DINOv2 image processor."""
    output_dir = check_output_dir(output_dir)
    model.save_pretrained(output_dir)
    dinov2_image_processor(crop_size=crop_size).save_pretrained(output_dir)
    return output_dir
