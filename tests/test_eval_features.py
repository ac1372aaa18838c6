"""Feature extraction equals direct model calls (registers, uneven batches) and counts undecodable images."""

import pytest
import torch
from conftest import randomize_
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from PIL import Image
from sklearn.datasets import load_sample_image

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.data.sources import DataSettings
from dinov2_hf.eval.features import dataset_features, extract_features
from dinov2_hf.modeling.processor import dinov2_image_processor


def sample_crops(n):
    china = Image.fromarray(load_sample_image("china.jpg"))
    return [china.crop((40 * i, 20 * i, 40 * i + 200, 20 * i + 150)) for i in range(n)]


def test_features_equal_direct_model_outputs(tiny_kwargs):
    model = randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs, num_register_tokens=4)), std=0.05).eval()
    images = sample_crops(5)
    processor = dinov2_image_processor(crop_size=56, resize_size=64)
    features = extract_features(model, [(image, i) for i, image in enumerate(images)], processor, batch_size=3,
                                n_last_blocks=2, return_patch_maps=True, progress=False)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
        second_last_cls = model.layernorm(out.hidden_states[-2])[:, 0]
    torch.testing.assert_close(features.cls, out.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.block_cls[:, 0], second_last_cls, rtol=1e-5, atol=1e-5)
    patches = out.last_hidden_state[:, 1 + 4 :]  # registers excluded
    torch.testing.assert_close(features.patch_mean, patches.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.extra["patch_maps"].flatten(2).transpose(1, 2), patches, rtol=1e-5, atol=1e-5)
    assert features.labels.tolist() == [0, 1, 2, 3, 4]
    assert features.linear_input(2, True).shape == (5, 3 * 64)
    with pytest.raises(ValueError, match="n_last_blocks=4"):
        features.linear_input(4, False)


def test_dataset_features_skip_and_count_bad_images(tmp_path, tiny_kwargs):
    for label, images in (("cat", sample_crops(3)), ("dog", sample_crops(2))):
        (tmp_path / label).mkdir()
        for i, image in enumerate(images):
            image.save(tmp_path / label / f"{i}.jpg")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model = Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)).eval()
    settings = DataSettings(source=str(tmp_path), label_column="label")
    features = dataset_features(model, settings, dinov2_image_processor(crop_size=28, resize_size=28), progress=False)
    assert len(features) == 5 and features.skipped == 1
    assert sorted(features.labels.tolist()) == [0, 0, 0, 1, 1]
    # DataLoader workers: the same features and labels (order may interleave), the bad image still counted
    in_workers = dataset_features(model, settings, dinov2_image_processor(crop_size=28, resize_size=28), num_workers=2,
                                  batch_size=2, progress=False)
    assert in_workers.skipped == 1 and len(in_workers) == 5

    def rows(f):
        return sorted(zip(f.labels.tolist(), f.cls.round(decimals=4).tolist()))

    assert rows(in_workers) == rows(features)
    with pytest.raises(ValueError, match="--label-column"):
        dataset_features(model, DataSettings(source=str(tmp_path)), progress=False)


def test_oversized_images_are_skipped_and_counted_in_process_and_in_workers_code(tmp_path):
    import io

    from dinov2_hf.eval.features import PreprocessedStream, labelled_images

    def example(size, label):
        buffer = io.BytesIO()
        Image.new("RGB", size, (label * 50, 0, 0)).save(buffer, format="PNG")
        return {"image": {"bytes": buffer.getvalue(), "path": None}, "label": label}

    stream = [example((10, 10), 0), example((40, 40), 1), example((12, 8), 2)]
    counter = {"skipped": 0}
    pairs = list(labelled_images(stream, "image", "label", counter, max_pixels=1000))
    assert [label for _, label in pairs] == [0, 2] and counter["skipped"] == 1
    counter = {"skipped": 0}
    assert len(list(labelled_images(stream, "image", "label", counter))) == 3 and counter["skipped"] == 0
    processor = dinov2_image_processor(crop_size=28, resize_size=28)
    items = list(PreprocessedStream(stream, processor, "image", "label", max_pixels=1000))
    assert [item if item is None else item[1] for item in items] == [0, None, 2]
