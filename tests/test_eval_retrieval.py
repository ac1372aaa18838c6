"""Retrieval mAP against scikit-learn and hand-checked cases; the copy-detection benchmark end to end."""

import itertools

import numpy as np
import pytest
import torch
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from sklearn.metrics import average_precision_score

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.data.sources import DataSettings, load_image_stream
from dinov2_hf.eval.features import extract_features, labelled_images
from dinov2_hf.eval.retrieval import (
    average_precision,
    copy_detection_metrics,
    cosine_ranking,
    make_copy_queries,
    mean_average_precision,
)
from dinov2_hf.modeling.processor import dinov2_image_processor


def test_standard_ap_equals_sklearn():
    rng = np.random.RandomState(0)
    for _ in range(20):
        scores, truth = rng.randn(40), rng.rand(40) < 0.2
        truth[rng.randint(40)] = True
        ranks = np.flatnonzero(truth[np.argsort(-scores)])
        assert average_precision(ranks, truth.sum()) == pytest.approx(average_precision_score(truth, scores))


def test_oxford_ap_hand_checked():
    # positives at ranks 0 and 2 of 2: (1+1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    assert average_precision([0, 2], 2, mode="oxford") == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # a positive never retrieved counts as zero
    assert average_precision([0], 2, mode="oxford") == pytest.approx(0.5)
    assert average_precision([1], 1, mode="standard") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown AP mode"):
        average_precision([0], 1, mode="trapezoid")


def reference_revisited_map(similarity, ground_truth, positive_keys, ignored_keys):
    """Independent: per query, drop ignored images, score with scikit-learn's AP on the raw similarities."""
    aps = []
    for scores, g in zip(similarity, ground_truth):
        positives = {i for key in positive_keys for i in g.get(key, [])}
        ignored = {i for key in ignored_keys for i in g.get(key, [])}
        if not positives:
            continue
        keep = [i for i in range(len(scores)) if i not in ignored]
        aps.append(average_precision_score([i in positives for i in keep], scores[keep]))
    return np.mean(aps)


def test_revisited_protocol_matches_reference():
    rng = np.random.RandomState(1)
    queries, database = torch.randn(12, 16), torch.randn(60, 16)
    ground_truth = []
    for q in range(12):
        picks = rng.permutation(60)
        ground_truth.append({"easy": picks[:3].tolist(), "hard": picks[3:6].tolist() if q % 4 else [], "junk": picks[6:9].tolist()})
    similarity = (torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(database, dim=1).t()).numpy()
    result = mean_average_precision(cosine_ranking(queries, database, chunk_size=5), ground_truth, mode="standard")
    assert result["easy"] == pytest.approx(reference_revisited_map(similarity, ground_truth, ["easy"], ["junk", "hard"]))
    assert result["medium"] == pytest.approx(reference_revisited_map(similarity, ground_truth, ["easy", "hard"], ["junk"]))
    assert result["hard"] == pytest.approx(reference_revisited_map(similarity, ground_truth, ["hard"], ["junk", "easy"]))
    simple = [{"ok": g["easy"], "junk": g["junk"]} for g in ground_truth]
    expected = reference_revisited_map(similarity, simple, ["ok"], ["junk"])
    assert mean_average_precision(cosine_ranking(queries, database), simple, mode="standard")["map"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="must match"):
        mean_average_precision(cosine_ranking(queries, database), ground_truth[:3])
    with pytest.raises(ValueError, match='"ok"'):
        mean_average_precision(cosine_ranking(queries[:1], database), [{"positives": [1]}])


def test_copy_detection_on_cifar_with_a_random_backbone(cifar_dir, tiny_kwargs):
    stream = load_image_stream(DataSettings(source=str(cifar_dir / "test-00000-of-00001.parquet"), split="test", shuffle_buffer=0))
    images = [image for image, _ in itertools.islice(labelled_images(stream, "image", None, {"skipped": 0}), 200)]
    queries, sources = make_copy_queries(images, 50, seed=3)
    again, sources_again = make_copy_queries(images, 50, seed=3)
    assert sources == sources_again and len(set(sources)) == 50
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(queries, again))  # seeded
    assert all(q.size == images[s].size for q, s in zip(queries, sources))
    assert not all(np.array_equal(np.asarray(q), np.asarray(images[s])) for q, s in zip(queries, sources))
    torch.manual_seed(0)
    model = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)).eval()
    processor = dinov2_image_processor(crop_size=56, resize_size=64)
    database = extract_features(model, [(i, None) for i in images], processor, batch_size=100, n_last_blocks=1, progress=False)
    copies = extract_features(model, [(q, None) for q in queries], processor, batch_size=100, n_last_blocks=1, progress=False)
    metrics = copy_detection_metrics(copies.cls, database.cls, sources)
    print(metrics)
    # reference: the source's position in a full sort of the database by decreasing cosine (numpy, float64)
    q, d = copies.cls.double().numpy(), database.cls.double().numpy()
    similarity = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    ranks = np.array([np.flatnonzero(np.argsort(-row, kind="stable") == s)[0] for row, s in zip(similarity, sources)])
    assert metrics["map"] == pytest.approx(np.mean(1 / (ranks + 1)))
    assert metrics["recall@1"] == pytest.approx(np.mean(ranks == 0))
    assert metrics["recall@1"] > 10 / 200, metrics  # far above chance (1/200) even with random weights
