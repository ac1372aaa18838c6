"""Evaluation throughput: feature extraction img/s and kNN time for 50k train x 10k test features.

    python scripts/bench_eval.py --out bench_eval.json                  # CPU (all cores), fp32
    python scripts/bench_eval.py --device cuda --out bench_eval_gpu.json  # bf16 autocast extraction

Feature extraction runs :func:`dinov2_hf.eval.extract_features` end to end (PIL decode already
done, DINOv2 image processor resize 256 -> center crop 224, forward, pooling) on real images
(CIFAR-10 from ../shared/data/cifar10 when present, else scikit-learn's two sample images
repeated), and also times the backbone forward alone on the processed batch. Models: the
``tiny`` preset and a ViT-S/14, random weights.

kNN: random 384-d features with 1000-class labels (50,000 train, 10,000 test), k in
{10, 20, 100, 200}: ours (``knn_classify``, chunked torch matmul + top-k) against a reference in the
same run: faiss ``IndexFlatIP`` exact search for the 200 nearest + the same weighted vote in numpy.
Both must give the same accuracies. Prints one JSON document (also written to --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
CIFAR = Path(os.environ.get("DINOV2_HF_CIFAR10", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))


def sample_images(n: int):
    from PIL import Image

    if (CIFAR / "test-00000-of-00001.parquet").is_file():
        from dinov2_hf.data.sources import DataSettings, load_image_stream
        from dinov2_hf.eval.features import labelled_images

        stream = load_image_stream(DataSettings(source=str(CIFAR / "test-00000-of-00001.parquet"), split="test", shuffle_buffer=0))
        return [image for image, _ in itertools.islice(labelled_images(stream, "image", None, {"skipped": 0}), n)], "cifar10 32x32"
    from sklearn.datasets import load_sample_image

    images = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    return [images[i % 2] for i in range(n)], "sklearn samples 640x427"


def bench_extraction(preset: str, images, device: str, batch_size: int) -> dict:
    from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
    from dinov2_hf.eval.features import extract_features
    from dinov2_hf.modeling.processor import dinov2_image_processor

    torch.manual_seed(0)
    model = Dinov2HFModel(Dinov2HFConfig.from_preset(preset, image_size=224)).eval().to(device)
    processor = dinov2_image_processor()
    pairs = [(image, None) for image in images]
    extract_features(model, pairs[:batch_size], processor, batch_size=batch_size, progress=False)  # warm-up
    start = time.perf_counter()
    extract_features(model, pairs, processor, batch_size=batch_size, progress=False)
    end_to_end = time.perf_counter() - start
    pixels = processor([image for image, _ in pairs[:batch_size]], return_tensors="pt")["pixel_values"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        model(pixels)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        repeats = 3 if device == "cpu" else 20
        for _ in range(repeats):
            model(pixels)
        if device == "cuda":
            torch.cuda.synchronize()
        forward = (time.perf_counter() - start) / repeats
    return {
        "preset": preset,
        "images": len(images),
        "batch_size": batch_size,
        "end_to_end_img_per_s": round(len(images) / end_to_end, 1),
        "forward_only_img_per_s": round(batch_size / forward, 1),
    }


def reference_knn_faiss(train, train_labels, test, ks, temperature, num_classes):
    import faiss

    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    similarity, neighbours = index.search(test, max(ks))
    weights, labels = np.exp(similarity / temperature), train_labels[neighbours]
    predictions = {}
    for k in ks:
        votes = np.zeros((len(test), num_classes))
        np.add.at(votes, (np.arange(len(test))[:, None], labels[:, :k]), weights[:, :k])
        predictions[k] = votes.argmax(1)
    return predictions


def bench_knn(n_train: int, n_test: int, dim: int, num_classes: int, device: str) -> dict:
    from dinov2_hf.eval.knn import knn_classify

    rng = np.random.RandomState(0)
    centers = rng.randn(num_classes, dim).astype(np.float32)
    train_labels, test_labels = rng.randint(0, num_classes, n_train), rng.randint(0, num_classes, n_test)
    train = centers[train_labels] + 3.0 * rng.randn(n_train, dim).astype(np.float32)  # noisy enough that k matters
    test = centers[test_labels] + 3.0 * rng.randn(n_test, dim).astype(np.float32)
    ks = (10, 20, 100, 200)
    start = time.perf_counter()
    ours = knn_classify(torch.from_numpy(train).to(device), torch.from_numpy(train_labels), torch.from_numpy(test),
                        torch.from_numpy(test_labels), ks=ks, num_classes=num_classes)
    if device == "cuda":
        torch.cuda.synchronize()
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_knn_faiss(train, train_labels, test, ks, 0.07, num_classes)
    faiss_seconds = time.perf_counter() - start
    reference_accuracy = {k: float((reference[k] == test_labels).mean()) for k in ks}
    return {
        "train": n_train, "test": n_test, "dim": dim, "classes": num_classes, "ks": list(ks),
        "ours_seconds": round(ours_seconds, 2), "faiss_reference_seconds": round(faiss_seconds, 2),
        "ours_top1": {k: round(v, 4) for k, v in ours.items()},
        "faiss_top1": {k: round(v, 4) for k, v in reference_accuracy.items()},
        "same_accuracy": all(abs(ours[k] - reference_accuracy[k]) <= 2 / n_test for k in ks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256, help="images per extraction run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="bench_eval.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    images, source = sample_images(args.images)
    report = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "extraction_images": source,
        "extraction": [bench_extraction(preset, images, args.device, args.batch_size) for preset in ("tiny", "vits14")],
        "knn": bench_knn(50_000, 10_000, 384, 1000, args.device),
    }
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
