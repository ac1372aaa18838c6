"""Dense heads: metrics against scikit-learn / numpy, near-perfect fits where a linear solution exists, pasted CIFAR objects."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from PIL import Image
from sklearn.datasets import load_sample_image
from sklearn.metrics import jaccard_score

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.data.sources import DataSettings, load_image_stream
from dinov2_hf.eval.dense import (
    HeadTraining,
    depth_metrics,
    pasted_objects,
    patch_feature_maps,
    predict,
    segmentation_metrics,
    to_pixel_values,
    train_depth_head,
    train_segmentation_head,
)
from dinov2_hf.eval.features import labelled_images


def test_segmentation_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (3, 10, 10), generator=g)
    predictions = torch.where(torch.rand(3, 10, 10, generator=g) < 0.7, masks, torch.randint(0, 4, (3, 10, 10), generator=g))
    masks[0, :2] = 255  # ignored
    predictions[predictions == 3] = 2  # class 3: in the ground truth, never predicted -> IoU 0
    result = segmentation_metrics(predictions, masks, num_classes=5)  # class 4: nowhere -> left out
    valid = masks != 255
    expected = jaccard_score(masks[valid].numpy(), predictions[valid].numpy(), labels=[0, 1, 2, 3], average=None)
    np.testing.assert_allclose(result["per_class_iou"][:4], expected)
    assert result["per_class_iou"][3] == 0 and result["per_class_iou"][4] is None
    assert result["miou"] == pytest.approx(expected.mean())
    assert result["pixel_accuracy"] == pytest.approx((masks[valid] == predictions[valid]).float().mean().item())


def test_depth_metrics_hand_checked_and_against_numpy():
    target = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0 = invalid
    result = depth_metrics(target * 1.2, target)
    assert result["delta1"] == 1.0 and result["abs_rel"] == pytest.approx(0.2)
    assert result["log_rmse"] == pytest.approx(np.log(1.2))
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((0.2 * np.array([1, 2, 4])) ** 2)))
    rng = np.random.RandomState(0)
    gt, pred = rng.uniform(0.5, 10, 500), rng.uniform(0.5, 10, 500)
    result = depth_metrics(torch.tensor(pred), torch.tensor(gt))
    assert result["delta1"] == pytest.approx(np.mean(np.maximum(pred / gt, gt / pred) < 1.25))
    assert result["log_rmse"] == pytest.approx(np.sqrt(np.mean((np.log(pred) - np.log(gt)) ** 2)))
    with pytest.raises(ValueError, match="no valid depth"):
        depth_metrics(torch.ones(2, 2), torch.zeros(2, 2))


def linear_world(n, seed, dim=12, grid=6, scale=7):
    """Patch features, and targets that a 1x1 conv + bilinear upsampling reproduces exactly."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, dim, grid, grid, generator=g)
    world = torch.Generator().manual_seed(100)  # the same true weights for every split
    weight, bias = torch.randn(4, dim, generator=world), torch.randn(4, generator=world)
    logits = F.interpolate(torch.einsum("cd,ndhw->nchw", weight, maps) + bias.view(1, -1, 1, 1), scale_factor=scale, mode="bilinear")
    depth = 5 + logits[:, 0]  # a linear function of the features, positive
    return maps, logits.argmax(1), depth


def test_heads_recover_a_known_linear_solution():
    train_maps, train_masks, train_depth = linear_world(64, 0)
    test_maps, test_masks, test_depth = linear_world(16, 1)
    # cross-entropy keeps sharpening a separable solution: a high lr gets there in few steps
    seg = train_segmentation_head(train_maps, train_masks, num_classes=4, settings=HeadTraining(epochs=60, lr=0.3))
    scores = segmentation_metrics(predict(seg, test_maps, test_masks.shape[-2:]), test_masks, 4)
    assert scores["miou"] > 0.95 and scores["pixel_accuracy"] > 0.98, scores
    depth = train_depth_head(train_maps, train_depth, settings=HeadTraining(epochs=60, lr=5e-2))
    scores = depth_metrics(predict(depth, test_maps, test_depth.shape[-2:]), test_depth)
    assert scores["rmse"] < 0.05 * test_depth.std().item() and scores["delta1"] > 0.99, scores


def test_bad_dense_inputs():
    maps = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="num_classes=2"):
        train_segmentation_head(maps, torch.full((2, 6, 6), 3), num_classes=2)
    with pytest.raises(ValueError, match="pair up"):
        train_segmentation_head(maps, torch.zeros(3, 6, 6, dtype=torch.long), num_classes=2)
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        train_depth_head(maps, torch.ones(2, 1, 6, 6))


def test_pasted_cifar_objects_have_exact_ground_truth_and_run_through_the_heads(cifar_dir, tiny_kwargs):
    stream = load_image_stream(DataSettings(source=str(cifar_dir / "test-00000-of-00001.parquet"), split="test", label_column="label", shuffle_buffer=0))
    objects = list(itertools.islice(labelled_images(stream, "image", "label", {"skipped": 0}), 24))
    backgrounds = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    images, masks, depths = pasted_objects(objects, backgrounds, size=112, seed=0)
    assert masks.shape == depths.shape == (24, 112, 112) and all(image.size == (112, 112) for image in images)
    again = pasted_objects(objects, backgrounds, size=112, seed=0)
    assert torch.equal(again[1], masks) and np.array_equal(np.asarray(again[0][3]), np.asarray(images[3]))
    for image, mask, depth, (obj, label) in zip(images, masks, depths, objects):
        # the mask is one square exactly where the CIFAR image was pasted, the depth is the object's plane there
        ys, xs = torch.nonzero(mask == label + 1, as_tuple=True)
        top, left, side = ys.min().item(), xs.min().item(), ys.max().item() - ys.min().item() + 1
        assert len(ys) == side * side and set(mask.unique().tolist()) == {0, label + 1}
        pasted = np.asarray(image)[top : top + side, left : left + side]
        np.testing.assert_array_equal(pasted, np.asarray(obj.resize((side, side), Image.Resampling.BICUBIC)))
        assert torch.all(depth[mask > 0] == 1 + (label % 5) / 4) and torch.all(depth[mask == 0] >= 2)
    # End to end with a random backbone (no accuracy claim: random features carry little of this task)
    torch.manual_seed(0)
    model = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)).eval()
    maps = patch_feature_maps(model, to_pixel_values(images, 112), batch_size=8)
    assert maps.shape == (24, 64, 8, 8)
    settings = HeadTraining(epochs=3, lr=1e-2)
    seg = train_segmentation_head(maps[:16], masks[:16], num_classes=11, settings=settings)
    predicted = predict(seg, maps[16:], (112, 112))
    assert predicted.shape == (8, 112, 112) and predicted.max() < 11
    scores = segmentation_metrics(predicted, masks[16:], 11)
    assert scores["pixel_accuracy"] == pytest.approx((predicted == masks[16:]).double().mean().item())
    depth = predict(train_depth_head(maps[:16], depths[:16], settings=settings), maps[16:], (112, 112))
    assert depth.shape == (8, 112, 112) and set(depth_metrics(depth, depths[16:])) == {"rmse", "log_rmse", "abs_rel", "delta1"}


def test_dense_split_skips_examples_whose_image_or_target_is_oversized():
    import io

    from dinov2_hf.eval.dense import load_dense_split

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    def example(image_size, mask_size, label):
        return {"image": png(Image.new("RGB", image_size, (label, 0, 0))), "mask": png(Image.new("L", mask_size, label))}

    stream = [example((8, 8), (8, 8), 1), example((40, 40), (8, 8), 2), example((8, 8), (40, 40), 3),
              example((8, 8), (8, 8), 4)]
    counter = {"skipped": 0}
    images, targets = load_dense_split(stream, "image", "mask", "mask", 4, max_pixels=1000, counter=counter)
    assert len(images) == 2 and targets[:, 0, 0].tolist() == [1, 4] and counter["skipped"] == 2
    images, targets = load_dense_split(stream, "image", "mask", "mask", 4)
    assert len(images) == 4 and targets[:, 0, 0].tolist() == [1, 2, 3, 4]
