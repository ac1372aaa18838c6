"""Streaming image sources through `datasets`: parquet shards, image folders, webdataset tars, Hub ids.

``load_image_stream`` returns a ``datasets.IterableDataset`` (``streaming=True``) whose image column
is left undecoded, shuffled with a buffer and split across ranks with ``split_dataset_by_node``.
``MultiCropStream`` turns it into multi-crop samples inside DataLoader workers, decoding each image
with :func:`open_rgb`: undecodable, truncated, empty or oversized (``max_image_pixels``) images are
skipped and counted (the counts travel in the samples' ``skipped`` field and add up to the exact total),
never a crash.
"""

from __future__ import annotations

import glob
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import PIL.Image
import torch
from datasets import Image as ImageFeature
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from .decode import MAX_IMAGE_PIXELS, ImageDecodeError, open_rgb
from .transforms import CropPlan

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class DataSettings:
    """Where the images come from and how they are read."""

    source: str = ""
    format: Literal["auto", "parquet", "imagefolder", "webdataset", "hub"] = "auto"
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = None
    shuffle_buffer: int = 10_000
    # Larger images are skipped and counted, refused from their header (a decompression bomb would kill a worker).
    max_image_pixels: int = MAX_IMAGE_PIXELS


def _files(source: str, suffixes: tuple[str, ...]) -> list[str]:
    path = Path(source)
    if path.is_dir():
        candidates = [str(p) for p in path.rglob("*")]
    elif any(ch in source for ch in "*?["):
        candidates = glob.glob(source)
    else:
        candidates = [source] if path.is_file() else []
    return sorted(c for c in candidates if Path(c).suffix in suffixes)


def builtin_digits(folder: str | Path | None = None) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside scikit-learn) as one parquet shard
    of 32x32 RGB PNGs with labels, written once under ``folder`` (default: the Hugging Face cache)."""
    if folder is None:
        from huggingface_hub.constants import HF_HOME

        folder = Path(HF_HOME) / "dinov2_hf" / "sklearn_digits"
    folder = Path(folder)
    shard = folder / "train-00000-of-00001.parquet"
    if shard.is_file():
        return folder
    import io
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:  # values 0..16
        image = Image.fromarray((pixels * (255 / 16)).astype("uint8")).resize((32, 32), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{shard.name}.{os.getpid()}.tmp"  # several ranks may write at once
    pq.write_table(pa.table({"image": images, "label": digits.target.tolist()}), temporary)
    os.replace(temporary, shard)
    return folder


@dataclass(frozen=True)
class SourceKeys:
    """What error messages call a source's settings: the trainer's keys (``data.source=...``) by default, or a
    command's own flags (``dinov2-hf eval``: ``--dataset ...``), so that the message names what the user wrote."""

    source: str = "data.source"
    split: str = "data.split"
    image_column: str = "data.image_column"
    label_column: str = "data.label_column"
    max_image_pixels: str = "data.max_image_pixels"

    @classmethod
    def section(cls, name: str) -> SourceKeys:
        """The keys of a config section holding :class:`DataSettings` fields, e.g. ``monitor``."""
        return cls(f"{name}.source", f"{name}.split", f"{name}.image_column", f"{name}.label_column",
                   f"{name}.max_image_pixels")

    def show(self, key: str, value) -> str:
        """``data.source='x'`` for a config key, ``--dataset 'x'`` for a flag."""
        return f"{key} {value!r}" if key.startswith("-") else f"{key}={value!r}"


def resolve_source(settings: DataSettings, keys: SourceKeys = SourceKeys()) -> tuple[str, dict]:
    """The `datasets` builder and its arguments for ``settings.source``; fails early and clearly."""
    source, fmt = settings.source, settings.format
    named = keys.show(keys.source, source)
    if not source:
        raise ValueError(f"{keys.source} is empty: give a folder of images, parquet/tar files (or a glob), or a Hub dataset id.")
    if source == "sklearn:digits":
        return "parquet", {"data_files": {settings.split: [str(builtin_digits() / "train-00000-of-00001.parquet")]}}
    path = Path(source)
    if fmt == "auto":
        if _files(source, (".parquet",)):
            fmt = "parquet"
        elif _files(source, (".tar",)):
            fmt = "webdataset"
        elif path.is_dir():
            fmt = "imagefolder"
        elif path.exists() or any(ch in source for ch in "*?[") or source.startswith((".", "/")):
            raise FileNotFoundError(f"{named}: no parquet shards, tar shards or images found there.")
        else:
            fmt = "hub"
    if fmt == "parquet":
        files = _files(source, (".parquet",))
        if not files:
            raise FileNotFoundError(f"{named}: no .parquet files found.")
        return "parquet", {"data_files": {settings.split: files}}
    if fmt == "webdataset":
        files = _files(source, (".tar",))
        if not files:
            raise FileNotFoundError(f"{named}: no .tar shards found.")
        return "webdataset", {"data_files": {settings.split: files}}
    if fmt == "imagefolder":
        if not path.is_dir():
            raise FileNotFoundError(f"{named} is not a folder of images.")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            raise FileNotFoundError(f"{named}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        return "imagefolder", {"data_dir": source}
    return source, {}


def _open(builder: str, kwargs: dict, settings: DataSettings, keys: SourceKeys) -> IterableDataset:
    """``load_dataset(..., streaming=True)`` with its failures named in the user's terms: a split the source
    lacks names the split key; a Hub id that cannot be read names both readings of the source, since a
    relative folder that does not exist (``data.source=my_images``) reads as a Hub id too."""
    try:
        return load_dataset(builder, split=settings.split, streaming=True, **kwargs)
    except Exception as error:  # connection, offline mode, not found, gated, bad split: all mean "cannot read it"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        if isinstance(error, ValueError) and "split" in reason.lower():
            raise ValueError(f"{keys.show(keys.split, settings.split)}: {settings.source!r} has no such split "
                             f"({reason}); pass {keys.split} with one of its splits.") from error
        if kwargs:  # local files: datasets' own message is about them
            raise
        raise FileNotFoundError(
            f"{keys.show(keys.source, settings.source)}: there is no such folder or file "
            f"({Path(settings.source).resolve()}), and as a Hub dataset id it could not be loaded "
            f"({type(error).__name__}: {reason}). Give an existing path, or a Hub id that exists (offline, "
            "with HF_HUB_OFFLINE=1, only datasets already in the cache load)."
        ) from error


def load_image_stream(
    settings: DataSettings, rank: int = 0, world_size: int = 1, seed: int = 0, keys: SourceKeys = SourceKeys()
) -> IterableDataset:
    """A shuffled, rank-split streaming dataset with the image column undecoded (bytes or path). Errors name the
    settings as ``keys`` does (the trainer's ``data.*`` keys by default)."""
    if settings.max_image_pixels < 1:
        raise ValueError(f"{keys.max_image_pixels} must be a positive pixel count; got {settings.max_image_pixels}.")
    builder, kwargs = resolve_source(settings, keys)
    stream = _open(builder, kwargs, settings, keys)
    columns = stream.column_names or list((stream.features or {}).keys())
    source = keys.show(keys.source, settings.source)
    if columns and settings.image_column not in columns:
        raise ValueError(
            f"{keys.show(keys.image_column, settings.image_column)} is not a column of {source}; columns: {columns}."
        )
    if settings.label_column and columns and settings.label_column not in columns:
        raise ValueError(
            f"{keys.show(keys.label_column, settings.label_column)} is not a column of {source}; columns: {columns}."
        )
    if stream.features is not None and isinstance(stream.features.get(settings.image_column), ImageFeature):
        stream = stream.cast_column(settings.image_column, ImageFeature(decode=False))
    if settings.shuffle_buffer > 1:
        options = {}
        if stream.num_shards <= 1 and "max_buffer_input_shards" in inspect.signature(stream.shuffle).parameters:
            # datasets >= 5 feeds the buffer through a threaded shard interleave that pauses 5 s at the
            # end of every pass over parquet files; with one shard there is nothing to interleave.
            options["max_buffer_input_shards"] = 1
        stream = stream.shuffle(seed=seed, buffer_size=settings.shuffle_buffer, **options)
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return stream


def image_source(value):
    """bytes, a path, or a PIL image, from whatever the image column holds."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path") or b""
    return value


def open_for_crops(source, transform, max_pixels: int | None = None) -> tuple[PIL.Image.Image, CropPlan | None]:
    """Decode ``source`` for ``transform``. For a :class:`MultiCropGeometry` its crops are drawn from the header's
    size first (``transform.plan``, the same RNG draws as cropping the decoded image), so that a JPEG much larger
    than every crop decodes reduced (``open_rgb``'s ``draft``); returns the image and that plan (None for other
    transforms, which get the full image)."""
    if not hasattr(transform, "plan"):
        return open_rgb(source, max_pixels=max_pixels), None
    plan = None

    def draft(width: int, height: int) -> int:
        nonlocal plan
        plan = transform.plan(width, height)
        return plan.reduction

    return open_rgb(source, max_pixels=max_pixels, draft=draft), plan


def example_seed(seed: int, worker: int, row: int) -> int:
    """The crop seed of row ``row`` (1-based) of DataLoader worker ``worker``'s stream in a pass seeded ``seed``."""
    return (seed << 48) + (worker << 40) + row


class MultiCropStream(torch.utils.data.IterableDataset):
    """Decode + multi-crop geometry over a streaming dataset, skipping and counting bad images.

    With ``seed``, each row's crops are drawn from :func:`example_seed` (seed, worker, row), so they do not
    depend on the rows before it, and a worker skips its first ``skip_rows[worker]`` rows without decoding
    them: a resumed pass continues where it stopped at the cost of reading, not decoding, what it skips.
    Samples carry ``worker`` and ``rows``, the rows its stream had given once the sample was made
    (see ``data.position``). Images of more than ``max_pixels`` pixels (``data.max_image_pixels``) are
    skipped and counted like undecodable ones.
    """

    def __init__(
        self,
        stream: IterableDataset,
        transform,
        image_column: str = "image",
        label_column: str | None = None,
        seed: int | None = None,
        skip_rows: list[int] | tuple[int, ...] = (),
        max_pixels: int | None = None,
    ) -> None:
        super().__init__()
        self.stream, self.transform = stream, transform
        self.image_column, self.label_column = image_column, label_column
        self.seed, self.skip_rows = seed, list(skip_rows)
        self.max_pixels = max_pixels

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the stream (shards and buffer) for a new epoch."""
        self.stream.set_epoch(epoch)

    def __iter__(self):
        # Each yielded sample carries the bad images met after it (up to the next good one); a sample is
        # held back until the next good image (or the end) so that trailing bad images are counted too.
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        skip = self.skip_rows[worker] if worker < len(self.skip_rows) else 0
        pending, skipped, row = None, 0, 0
        for row, example in enumerate(self.stream, start=1):
            if row <= skip:
                continue  # consumed before a resume: read, not decoded
            if self.seed is not None:
                self.transform.rng.seed(example_seed(self.seed, worker, row))
            try:
                image, plan = open_for_crops(image_source(example[self.image_column]), self.transform, self.max_pixels)
            except ImageDecodeError:
                skipped += 1
                continue
            if pending is not None:
                pending["skipped"], pending["rows"] = skipped, row - 1
                skipped = 0
                yield pending
            pending = self.transform(image, plan) if plan is not None else self.transform(image)
            pending["worker"] = worker
            if self.label_column is not None:
                pending["labels"] = example[self.label_column]
        if pending is not None:
            pending["skipped"], pending["rows"] = skipped, row
            yield pending
