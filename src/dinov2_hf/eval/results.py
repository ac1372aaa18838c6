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


def headline_metrics(task: str, metrics: dict) -> dict[str, tuple[str, float]]:
    """``{metric name: (metric type, value)}`` worth a model-index entry for one task's metrics."""
    if task == "knn":
        return {f"kNN top-1 (k={key.split('_k')[1]})": ("accuracy", v) for key, v in metrics.items()}
    if task in ("linear", "logreg"):
        return {("Linear probe top-1" if task == "linear" else "Logistic regression top-1"): ("accuracy", metrics["top1"])}
    if task == "retrieval":
        return {f"mAP ({name})" if name != "map" else "mAP": ("map", v) for name, v in metrics.items()}
    if task == "copydetect":
        return {"Copy detection mAP": ("map", metrics["map"]), "Copy detection recall@1": ("recall", metrics["recall@1"])}
    if task == "segmentation":
        return {"mIoU": ("mean_iou", metrics["miou"])}
    if task == "depth":
        return {"RMSE": ("rmse", metrics["rmse"]), "delta<1.25": ("delta1", metrics["delta1"])}
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_TYPES)}.")


def eval_results(record: dict, dataset_name: str | None = None) -> list:
    """huggingface_hub ``EvalResult`` entries (a model card's model-index) for one results record."""
    from huggingface_hub import EvalResult

    task = record["task"]
    task_type, task_name = TASK_TYPES[task]
    dataset = record.get("dataset", {})
    source = str(dataset.get("test") or dataset.get("train") or "unknown")
    name = dataset_name or source
    split = source.rsplit("[", 1)[1].rstrip("]") if source.endswith("]") else None
    return [
        EvalResult(task_type=task_type, task_name=task_name, dataset_type=name.split(" [")[0], dataset_name=name,
                   dataset_split=split, metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4))
        for metric_name, (metric_type, value) in headline_metrics(task, record["metrics"]).items()
    ]


def update_model_card(card_path: str | Path, records: list[dict], model_name: str, dataset_name: str | None = None):
    """Add (or replace) the model-index entries of ``records`` in the model card at ``card_path`` (created if missing).

    An entry with the same task, dataset and metric name is replaced, so re-running an evaluation updates the card.
    """
    from huggingface_hub import ModelCard, ModelCardData

    card_path = Path(card_path)
    if card_path.is_file():
        card = ModelCard.load(card_path)
    else:
        card = ModelCard.from_template(ModelCardData(library_name="transformers", tags=["dinov2", "image-feature-extraction"]),
                                       model_id=model_name)
    new = [entry for record in records for entry in eval_results(record, dataset_name)]
    key = lambda e: (e.task_type, e.dataset_name, e.dataset_split, e.metric_name)  # noqa: E731
    replaced = {key(e) for e in new}
    card.data.eval_results = [e for e in (card.data.eval_results or []) if key(e) not in replaced] + new
    card.data.model_name = card.data.model_name or model_name
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card.save(card_path)
    return card
