"""Our evaluate metric modules load from a local path (offline) and agree with scikit-learn."""

import numpy as np
import pytest
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from sklearn.metrics import accuracy_score, average_precision_score, jaccard_score, mean_squared_error

from dinov2_hf.eval.metrics import load_metric


def test_top1_accuracy_module():
    rng = np.random.RandomState(0)
    predictions, references = rng.randint(0, 5, 100), rng.randint(0, 5, 100)
    result = load_metric("top1_accuracy").compute(predictions=predictions, references=references)
    assert result["top1"] == pytest.approx(accuracy_score(references, predictions))


def test_mean_iou_module_with_batches():
    rng = np.random.RandomState(1)
    references = [rng.randint(0, 3, (6, 7)) for _ in range(4)]
    predictions = [np.where(rng.rand(6, 7) < 0.6, r, rng.randint(0, 3, (6, 7))) for r in references]
    metric = load_metric("mean_iou")
    for p, r in zip(predictions, references):  # incremental batches, as evaluate is used in loops
        metric.add_batch(predictions=[p], references=[r])
    result = metric.compute(num_classes=3)
    flat_r, flat_p = np.concatenate([r.ravel() for r in references]), np.concatenate([p.ravel() for p in predictions])
    expected = jaccard_score(flat_r, flat_p, average=None)
    np.testing.assert_allclose(result["per_class_iou"], expected)
    assert result["miou"] == pytest.approx(expected.mean())


def test_depth_error_module():
    rng = np.random.RandomState(2)
    references = [rng.uniform(1, 5, (4, 4)).astype(np.float32) for _ in range(3)]
    predictions = [r + rng.normal(0, 0.3, (4, 4)).astype(np.float32) for r in references]
    result = load_metric("depth_error").compute(predictions=predictions, references=references)
    flat_r, flat_p = np.concatenate([r.ravel() for r in references]), np.concatenate([p.ravel() for p in predictions])
    assert result["rmse"] == pytest.approx(np.sqrt(mean_squared_error(flat_r, flat_p)), rel=1e-5)


def test_retrieval_map_module():
    rng = np.random.RandomState(3)
    scores = rng.randn(5, 30)
    references = [{"positives": rng.choice(30, 3, replace=False).tolist(), "junk": []} for _ in range(5)]
    rankings = np.argsort(-scores, axis=1)
    result = load_metric("retrieval_map").compute(predictions=rankings.tolist(), references=references)
    expected = np.mean([average_precision_score(np.isin(np.arange(30), r["positives"]), s) for s, r in zip(scores, references)])
    assert result["map"] == pytest.approx(expected)


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="available: top1_accuracy"):
        load_metric("accuracy")
