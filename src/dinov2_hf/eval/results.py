"""Evaluation results: one JSON file per run, and model-index entries for a model card."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

# How each task's headline metric is named in a model card's model-index.
TASK_TYPES = {
    "knn": ("image-classification", "Image Classification"),
    "linear": ("image-classification", "Image Classification"),
    "logreg": ("image-classification", "Image Classification"),
    "retrieval": ("image-retrieval", "Image Retrieval"),
    "copydetect": ("image-retrieval", "Image Retrieval"),
    "segmentation": ("image-segmentation", "Semantic Segmentation"),
    "depth": ("depth-estimation", "Depth Estimation"),
}


def write_results(path: str | Path, task: str, metrics: dict, **info) -> dict:
    """Write ``{"task", "metrics", **info, "environment"}`` as JSON to ``path`` and return it."""
    record = {"task": task, "metrics": metrics, **info,
              "environment": {"torch": torch.__version__, "python": platform.python_version()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float))
    return record
