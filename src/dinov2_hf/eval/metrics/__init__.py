"""``evaluate`` metric modules that load from this package, never from the Hub.

``evaluate.load("accuracy")`` downloads the metric's code; these modules ship with dinov2_hf and
compute with its own tested functions::

    from dinov2_hf.eval.metrics import load_metric
    miou = load_metric("mean_iou")
    miou.compute(predictions=pred_maps, references=label_maps, num_classes=150)

Modules: ``top1_accuracy``, ``mean_iou``, ``depth_error``, ``retrieval_map``.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("top1_accuracy", "mean_iou", "depth_error", "retrieval_map")


def metric_path(name: str) -> Path:
    """The folder of a metric module (pass it to ``evaluate.load``)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRIC_NAMES)}.")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of one of our metric modules, from its local path (works offline)."""
    try:
        import evaluate
    except ImportError as error:
        raise ImportError("the metric modules need the `evaluate` package: pip install evaluate") from error
    return evaluate.load(str(metric_path(name)), **kwargs)
