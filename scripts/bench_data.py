"""Images/s of the DINOv2 multi-crop pipeline: ours vs a straightforward per-crop PIL pipeline.

    python scripts/bench_data.py --out benchmarks/bench_data_cpu.json
    python scripts/bench_data.py --workers 1 --jpeg-size 500x375 --out benchmarks/bench_data_cpu_per_core.json
    python scripts/bench_data.py --images cifar --global-size 32 --local-size 16   # CIFAR-scale crops

Both pipelines start from encoded JPEG/PNG bytes and end with normalised float tensors for
2 global + 8 local crops per image, on the same cores (``--workers`` processes each):
- baseline: per crop, PIL RandomResizedCrop + flip + ColorJitter (PIL ImageEnhance, HSV hue) +
  grayscale + PIL Gaussian blur + solarize + to-tensor + normalise, as the official code applies
  torchvision transforms to PIL images;
- ours: decode + geometric crops per image (``MultiCropGeometry``), then the photometric part
  batched (``BatchedPhotometric``) in the same worker processes, or on the GPU with ``--device cuda``;
- ours, CPU side only: what the workers feed when the photometric part runs on an accelerator;
- where kornia is installed, our batched photometric ops against kornia's equivalent pipeline.

``levers`` in the JSON: each variant of ours alone (name, img/s, ratio to the baseline of the same run):
``pil_resize`` (one PIL ``Image.resize(box=...)`` per crop, the former geometry) vs ``torch_resize`` (one
decode to a tensor, torch's uint8 antialiased bicubic per crop), ``draft`` (JPEG DCT-reduced decoding when
every crop box is at least 2x its output size), with ``--images cifar`` ``device_resize`` (workers decode and
draw the boxes; ``crops_from_boxes`` cuts the batch where the photometric part runs), end to end (the rest in
the workers) and CPU side only. ``ours_img_per_s`` is the fastest end-to-end lever (named beside it).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dinov2_hf.data import open_rgb  # noqa: E402
from dinov2_hf.data.collate import MultiCropCollator  # noqa: E402
from dinov2_hf.data.sources import open_for_crops  # noqa: E402
from dinov2_hf.data.transforms import (  # noqa: E402
    BatchedPhotometric,
    MultiCropGeometry,
    MultiCropSettings,
    crops_from_boxes,
    random_resized_crop_box,
)
from dinov2_hf.modeling.processor import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def sample_images(kind: str, count: int, jpeg_size: tuple[int, int] | None = None) -> list[bytes]:
    """Encoded images: scikit-learn's two 640x427 JPEGs (resized to ``jpeg_size`` first if given), or CIFAR-10
    PNGs from ../shared/data."""
    if kind == "jpeg":
        from sklearn.datasets import load_sample_image

        encoded = []
        for name in ("china.jpg", "flower.jpg"):
            buffer = io.BytesIO()
            image = Image.fromarray(load_sample_image(name))
            if jpeg_size is not None:
                image = image.resize(jpeg_size, Image.Resampling.BICUBIC)
            image.save(buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
        return [encoded[i % 2] for i in range(count)]
    import pyarrow.parquet as pq

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test-00000-of-00001.parquet"
    column = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    return [column[i % len(column)]["bytes"] for i in range(count)]


class PILBaseline:
    """The per-crop PIL pipeline (torchvision semantics, one crop at a time)."""

    def __init__(self, settings: MultiCropSettings, seed: int) -> None:
        self.settings = settings
        self.rng = random.Random(seed)
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)

    def jitter(self, image: Image.Image) -> Image.Image:
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(self.rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Contrast(im).enhance(self.rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Color(im).enhance(self.rng.uniform(0.8, 1.2)),
            self.hue,
        ]
        self.rng.shuffle(ops)
        for op in ops:
            image = op(image)
        return image

    def hue(self, image: Image.Image) -> Image.Image:
        h, s, v = image.convert("HSV").split()
        shift = int(self.rng.uniform(-0.1, 0.1) * 255)
        h = Image.fromarray((np.asarray(h, dtype=np.uint8) + np.uint8(shift % 256)).astype(np.uint8), "L")
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def crop(self, image: Image.Image, size: int, scale, blur_p: float, solarize_p: float) -> torch.Tensor:
        box = random_resized_crop_box(image.width, image.height, scale, self.rng)
        crop = image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
        if self.rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rng.random() < 0.8:
            crop = self.jitter(crop)
        if self.rng.random() < 0.2:
            crop = crop.convert("L").convert("RGB")
        if self.rng.random() < blur_p:
            crop = crop.filter(ImageFilter.GaussianBlur(self.rng.uniform(0.1, 2.0)))
        if self.rng.random() < solarize_p:
            crop = ImageOps.solarize(crop, 128)
        array = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std)

    def __call__(self, data: bytes) -> dict:
        image = open_rgb(data)
        s = self.settings
        return {
            "global_crops": [
                self.crop(image, s.global_crops_size, s.global_crops_scale, 1.0, 0.0),
                self.crop(image, s.global_crops_size, s.global_crops_scale, 0.1, 0.2),
            ],
            "local_crops": [
                self.crop(image, s.local_crops_size, s.local_crops_scale, 0.5, 0.0) for _ in range(s.local_crops_number)
            ],
        }


class OursDataset(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes], settings: MultiCropSettings, seed: int, resize: str = "torch", draft: bool = False) -> None:
        self.images, self.geometry, self.draft = images, MultiCropGeometry(settings, seed=seed, resize=resize), draft

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if not self.draft:
            return self.geometry(open_rgb(self.images[index]))
        return self.geometry(*open_for_crops(self.images[index], self.geometry))  # as MultiCropStream decodes


class BaselineDataset(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes], settings: MultiCropSettings, seed: int) -> None:
        self.images, self.pipeline = images, PILBaseline(settings, seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.pipeline(self.images[index])


def augment(batch: dict, photometric: BatchedPhotometric, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops of a stacked batch (cut here for ``resize=device``), photometric part on ``device``."""
    if "images" in batch:
        global_crops, local_crops = crops_from_boxes(batch["images"].to(device, non_blocking=True), batch["crop_boxes"])
    else:
        global_crops, local_crops = (batch[key].to(device, non_blocking=True) for key in ("global_crops", "local_crops"))
    return photometric.global_crops(global_crops), photometric.local_crops(local_crops)


class PhotometricCollate:
    """Stacks crops (or images and boxes) and runs the rest of the pipeline in the worker (CPU mode)."""

    def __init__(self, photometric: BatchedPhotometric | None) -> None:
        self.photometric = photometric

    def __call__(self, samples: list[dict]) -> dict:
        batch = MultiCropCollator.stack(samples)
        if self.photometric is not None:
            torch.set_num_threads(1)
            global_crops, local_crops = augment(batch, self.photometric, "cpu")
            return {"global_crops": global_crops, "local_crops": local_crops}
        return batch


def run(dataset, collate, batch_size: int, workers: int, device: str, photometric: BatchedPhotometric | None) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, persistent_workers=False, prefetch_factor=2 if workers else None
    )
    iterator = iter(loader)
    next(iterator)  # workers started, first batch out
    start, count = time.perf_counter(), 0
    for batch in iterator:
        if photometric is not None:  # device mode: the photometric part (and device crops) run here
            augment(batch, photometric, device)
        count += len(batch["images"]) if "images" in batch else len(batch["global_crops"]) // 2
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def photometric_vs_kornia(device: str, repeats: int = 7) -> dict | None:
    """Milliseconds for the photometric part on 64 uint8 crops of 224: ours vs kornia's equivalent
    (ColorJitter p=0.8, grayscale p=0.2, blur 9 / sigma 0.1-2 p=0.5, normalise). None without kornia."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    import statistics

    crops = (torch.rand(64, 3, 224, 224) * 255).to(torch.uint8).to(device)
    kornia_pipeline = K.AugmentationSequential(
        K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((9, 9), (0.1, 2.0), p=0.5),
        K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)),
    ).to(device)
    ours = BatchedPhotometric()
    timings = {}
    for name, run in (("kornia", lambda: kornia_pipeline(crops.float() / 255)), ("ours", lambda: ours.local_crops(crops))):
        run()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        timings[f"{name}_ms_per_64x224"] = round(statistics.median(times) * 1000, 1)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", choices=["jpeg", "cifar"], default="jpeg")
    parser.add_argument("--jpeg-size", default="500x375", help="WxH the sample JPEGs are resized to before encoding, or 'native' (640x427)")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    settings = MultiCropSettings(global_crops_size=args.global_size, local_crops_size=args.local_size)
    jpeg_size = None if args.jpeg_size == "native" else tuple(int(v) for v in args.jpeg_size.split("x"))
    images = sample_images(args.images, args.count + args.batch_size, jpeg_size)
    photometric = BatchedPhotometric()
    results = {}
    baseline = run(BaselineDataset(images, settings, 0), MultiCropCollator.stack, args.batch_size, args.workers, "cpu", None)
    results["baseline_pil_img_per_s"] = round(baseline, 1)

    def ours(resize: str, draft: bool, cpu_side_only: bool) -> float:
        dataset = OursDataset(images, settings, 0, resize=resize, draft=draft)
        if cpu_side_only:
            return run(dataset, PhotometricCollate(None), args.batch_size, args.workers, "cpu", None)
        if args.device == "cpu":
            return run(dataset, PhotometricCollate(photometric), args.batch_size, args.workers, "cpu", None)
        return run(dataset, PhotometricCollate(None), args.batch_size, args.workers, "cuda", photometric)

    levers = []
    for cpu_side_only in (False, True):
        for resize, draft in (("pil", False), ("torch", False), ("torch", True), ("device", False)):
            if resize == "device" and args.images != "cifar":
                continue  # device crops sample without antialiasing: for images about the crop size
            name = f"{'cpu_side_only' if cpu_side_only else 'end_to_end'}:{resize}_resize{'+draft' if draft else ''}"
            value = ours(resize, draft, cpu_side_only)
            levers.append({"name": name, "img_per_s": round(value, 1), "ratio_to_baseline": round(value / baseline, 2)})
            print(levers[-1], flush=True)
    results["levers"] = levers
    # "ours": the best lever; CPU side only: what the worker cores feed when the rest runs on an accelerator.
    for part, key in (("end_to_end", "ours_img_per_s"), ("cpu_side_only", "ours_cpu_side_only_img_per_s")):
        fastest = max((lever for lever in levers if lever["name"].startswith(part)), key=lambda lever: lever["img_per_s"])
        results[key], results[f"{key}_lever"] = fastest["img_per_s"], fastest["name"]
    results["speedup"] = round(results["ours_img_per_s"] / baseline, 2)
    results["cpu_side_speedup"] = round(results["ours_cpu_side_only_img_per_s"] / baseline, 2)
    if args.workers:
        results["cpu_side_only_img_per_s_per_core"] = round(results["ours_cpu_side_only_img_per_s"] / args.workers, 1)
    comparison = photometric_vs_kornia(args.device)
    if comparison:
        results["photometric_vs_kornia"] = comparison
    document = {
        "benchmark": "bench_data",
        "images": args.images,
        "jpeg_size": args.jpeg_size if args.images == "jpeg" else None,
        "command": "python scripts/bench_data.py " + " ".join(sys.argv[1:]),
        "crops": f"2x{args.global_size} + 8x{args.local_size}",
        "workers": args.workers,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        **results,
    }
    print(json.dumps(document, indent=2))
    if args.out:
        args.out.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
