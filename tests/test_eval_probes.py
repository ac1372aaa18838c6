"""Linear probe and logistic regression: exact per-head learning rates, scikit-learn parity, and a real ranking on CIFAR-10."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.data.sources import DataSettings, load_image_stream
from dinov2_hf.eval.features import Features, extract_features, labelled_images
from dinov2_hf.eval.knn import knn_classify
from dinov2_hf.eval.linear import StackedLinear, linear_probe, logistic_regression, train_val_split
from dinov2_hf.modeling.processor import dinov2_image_processor


def test_stacked_heads_step_like_separate_linears_with_their_own_lr():
    torch.manual_seed(0)
    lrs = [0.01, 0.1, 1.0]
    stacked = StackedLinear(5, 3, lrs)
    separate = []
    for h, lr in enumerate(lrs):
        linear = torch.nn.Linear(5, 3)
        with torch.no_grad():
            linear.weight.copy_(stacked.weight[h].t())
            linear.bias.copy_(stacked.bias[h, 0])
        separate.append((linear, torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9)))
    optimizer = torch.optim.SGD(stacked.parameters(), lr=1.0, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        logits = stacked(x)
        loss = sum(F.cross_entropy(logits[h], y) for h in range(len(lrs)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for linear, opt in separate:
            opt.zero_grad()
            F.cross_entropy(linear(x), y).backward()
            opt.step()
    for h, (linear, _) in enumerate(separate):
        torch.testing.assert_close(stacked.weight[h].t(), linear.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stacked.bias[h, 0], linear.bias, rtol=1e-5, atol=1e-6)


def test_split_is_seeded_and_disjoint():
    fit, val = train_val_split(100, 0.2, seed=3)
    assert len(val) == 20 and len(fit) == 80 and not set(fit) & set(val)
    assert (train_val_split(100, 0.2, seed=3)[1] == val).all()
    assert not (train_val_split(100, 0.2, seed=4)[1] == val).all()
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(10, 1.5)


def synthetic_features(n, seed, informative_block):
    """Labels are readable linearly only from one part of the features: the probe must find that input."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    block_cls = torch.randn(n, 4, 8, generator=g)
    patch_mean = torch.randn(n, 8, generator=g)
    signal = F.one_hot(labels, 8).float() * 5
    if informative_block == "patch":
        patch_mean += signal
    else:
        block_cls[:, informative_block] += signal
    return Features(block_cls, patch_mean, labels)


@pytest.mark.parametrize("where, n_blocks, avgpool", [(0, 4, False), ("patch", 1, True)])
def test_probe_picks_an_input_that_holds_the_signal(where, n_blocks, avgpool):
    train, test = synthetic_features(600, 0, where), synthetic_features(200, 1, where)
    result = linear_probe(train, test, learning_rates=(1e-4, 0.1), epochs=5, batch_size=64)
    assert result["best"]["lr"] == 0.1
    assert result["best"]["avgpool"] is avgpool
    if where == 0:  # the first of 4 blocks: only the 4-block inputs see it
        assert result["best"]["n_blocks"] == n_blocks
    assert result["top1"] > 0.95
    assert len(result["heads"]) == 2 * 2 * 2
    # validation accuracies are real: the 1-block CLS-only heads see pure noise in the first case
    if where == 0:
        assert max(v for k, v in result["heads"].items() if k.startswith("blocks1_cls")) < 0.6


def test_logistic_regression_matches_sklearn_directly():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.RandomState(0)
    centers = rng.randn(3, 6)
    y, y_test = rng.randint(0, 3, 300), rng.randint(0, 3, 100)
    x, x_test = centers[y] + rng.randn(300, 6) * 1.5, centers[y_test] + rng.randn(100, 6) * 1.5
    result = logistic_regression(x, y, x_test, y_test, c_values=(1e-4, 1e-2, 1.0), val_fraction=0.2, seed=1)
    fit, val = train_val_split(300, 0.2, seed=1)
    scaler = StandardScaler().fit(x[fit])
    for c, accuracy in result["val_top1"].items():
        reference = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x[fit]), y[fit])
        assert accuracy == pytest.approx(reference.score(scaler.transform(x[val]), y[val]))
    best_c = max(result["val_top1"], key=result["val_top1"].get)
    scaler = StandardScaler().fit(x)
    final = LogisticRegression(C=best_c, max_iter=1000).fit(scaler.transform(x), y)
    assert result["best_c"] == best_c
    assert result["top1"] == pytest.approx(final.score(scaler.transform(x_test), y_test))


def test_bad_inputs_are_named():
    features = synthetic_features(50, 0, 0)
    with pytest.raises(ValueError, match="n_blocks"):
        linear_probe(features, features, n_blocks=(8,))
    with pytest.raises(ValueError, match="needs labels"):
        linear_probe(Features(features.block_cls, features.patch_mean), features)
    with pytest.raises(ValueError, match="same dim"):
        logistic_regression(np.zeros((4, 3)), np.zeros(4), np.zeros((2, 5)), np.zeros(2))


def cifar_images(cifar_dir, name, n):
    stream = load_image_stream(DataSettings(source=str(cifar_dir / name), split="train", label_column="label", shuffle_buffer=0))
    return list(itertools.islice(labelled_images(stream, "image", "label", {"skipped": 0}), n))


@pytest.mark.slow
def test_probes_rank_a_briefly_trained_backbone_above_random_init(cifar_dir):
    """Stand-in for a briefly SSL-trained backbone: 250 supervised steps on 2,000 CIFAR training images.

    (Short SSL runs collapse on CPU; a random ViT's features are a strong baseline, so the bar is real.)
    """
    torch.manual_seed(0)
    train_images = cifar_images(cifar_dir, "train-00000-of-00005.parquet", 3000)
    test_images = cifar_images(cifar_dir, "test-00000-of-00001.parquet", 400)
    processor = dinov2_image_processor(crop_size=32, resize_size=32)
    config = Dinov2HFConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4,
                            intermediate_size=128)
    random_model = Dinov2HFModel(config).eval()
    model = copy.deepcopy(random_model).train()
    backbone_images, probe_images = train_images[:2000], train_images[2000:]  # probes see unseen images
    pixels = processor([image for image, _ in backbone_images], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([label for _, label in backbone_images])
    head = torch.nn.Linear(64, 10)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = torch.randint(0, len(pixels), (64,), generator=generator)
        loss = F.cross_entropy(head(model(pixels[batch]).pooler_output), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = {}
    for name, backbone in (("random", random_model), ("trained", model.eval())):
        train = extract_features(backbone, probe_images, processor, batch_size=250, n_last_blocks=2, progress=False)
        test = extract_features(backbone, test_images, processor, batch_size=250, n_last_blocks=2, progress=False)
        scores[name] = {
            "knn": knn_classify(train.cls, train.labels, test.cls, test.labels, ks=(20,))[20],
            "linear": linear_probe(train, test, n_blocks=(1, 2), learning_rates=(1e-3, 1e-2, 1e-1), epochs=10)["top1"],
            "logreg": logistic_regression(train.cls, train.labels, test.cls, test.labels, c_values=(1e-2, 1.0))["top1"],
        }
    print(scores)
    for protocol in ("knn", "linear", "logreg"):
        assert scores["trained"][protocol] > scores["random"][protocol] + 0.03, scores
        assert scores["trained"][protocol] > 0.2, scores  # chance is 0.1
