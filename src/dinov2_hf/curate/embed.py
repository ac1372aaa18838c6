"""Stage 1: embed every image of a source into sharded, resumable embedding files.

Rows are read in the source's fixed order (no shuffling), so a row's position is its id across
stages: the write stage reads the same positions back. Each shard covers ``shard_size`` consecutive
rows and holds, for the rows that decoded, their positions, L2-normalised embeddings and a content
hash of the encoded bytes (for exact deduplication). A shard is written to a temporary file and
renamed, so a killed run leaves only complete shards; a rerun skips them without decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ..config_utils import ConfigError, to_dict
from ..data.decode import ImageDecodeError, open_rgb
from ..data.sources import image_source, load_image_stream
from .config import EmbedSettings, SourceSettings

HASH_BYTES = 16
COMPLETE = "complete.json"


def iter_rows(settings: SourceSettings) -> Iterator[tuple[int, dict]]:
    """(position, example) for each row of ``settings`` in the source's own order; images undecoded."""
    stream = load_image_stream(settings)  # shuffle_buffer 0: a fixed order, positions are ids
    columns = stream.column_names or []
    if settings.id_column and columns and settings.id_column not in columns:
        raise ConfigError(f"id_column={settings.id_column!r} is not a column of {settings.source!r}; columns: {columns}.")
    if settings.limit is not None:
        stream = stream.take(settings.limit)
    # Batched ``.iter`` reads the whole source even inside a DataLoader worker, where iterating the
    # stream itself would yield only that worker's part (datasets splits it): positions stay global.
    position = 0
    for batch in stream.iter(batch_size=256):
        names = list(batch)
        for values in zip(*batch.values()):
            yield position, dict(zip(names, values))
            position += 1


def encoded_bytes(value) -> bytes:
    """The encoded image bytes of an image-column value (bytes, a path, or a {bytes, path} dict)."""
    source = image_source(value)
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return Path(source).read_bytes()
    if isinstance(source, Image.Image):
        return source.tobytes()
    return b""


def content_hash(data: bytes) -> np.ndarray:
    return np.frombuffer(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), dtype=np.uint8)


class BackboneEmbedder:
    """Batches of PIL images -> L2-normalised CLS embeddings of any backbone :func:`load_backbone` reads.

    The model is loaded on the first batch, so a rerun whose embeddings are all done never loads it.
    A random ``preset`` (``model: null``) is initialised from ``seed``: the same weights on every run.
    """

    def __init__(self, settings: EmbedSettings, seed: int = 0) -> None:
        from ..modeling import dinov2_image_processor, resize_for_crop

        self.settings, self.seed = settings, seed
        self.resize = settings.resize_size or resize_for_crop(settings.image_size)
        source = settings.model if settings.model is not None else f"random {settings.preset} {settings.overrides} seed {seed}"
        # What makes two embedding runs comparable: a rerun with another signature must not reuse shards.
        self.signature = f"{source} | crop {settings.image_size} resize {self.resize} | {settings.dtype}"
        self.model = None
        self.processor = dinov2_image_processor(crop_size=settings.image_size, resize_size=self.resize)

    def load(self) -> None:
        from ..modeling import Dinov2HFConfig, Dinov2HFModel
        from ..modeling.loading import load_backbone

        settings = self.settings
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.dtype = torch.device(device), getattr(torch, settings.dtype)
        if settings.model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = Dinov2HFModel(Dinov2HFConfig.from_preset(settings.preset, **settings.overrides))
        else:
            model, _ = load_backbone(settings.model, settings.preset)
        self.model = model.to(self.device, self.dtype).eval()

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize, crop, normalise: runs in the DataLoader workers."""
        return self.processor(list(images), return_tensors="pt")["pixel_values"]

    def forward(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised CLS embeddings of preprocessed images: runs in the main process."""
        if self.model is None:
            self.load()  # outside inference mode: the weights stay ordinary tensors
        with torch.inference_mode():
            features = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output.float()
            return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.forward(self.preprocess(images))


@dataclass
class Embeddings:
    """All embeddings of one source: ``positions[i]`` is the source row of ``vectors[i]``."""

    vectors: np.ndarray  # (n, d) float32, L2-normalised
    positions: np.ndarray  # (n,) int64
    hashes: np.ndarray  # (n, HASH_BYTES) uint8
    rows: int  # rows read, undecodable ones included
    skipped: int  # undecodable rows


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def _check_signature(folder: Path, signature: dict) -> None:
    """Refuse to mix shards made by another model or from another source: name the fix."""
    meta = folder / "meta.json"
    if meta.is_file():
        previous = json.loads(meta.read_text())
        if previous != signature:
            changed = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
            raise ConfigError(
                f"{folder} holds embeddings made with other settings ({', '.join(changed)} differ): "
                "delete that folder to recompute them, or choose another output.output_dir."
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(signature, indent=2))


def embed_source(
    settings: SourceSettings,
    embed: Callable[[Sequence[Image.Image]], np.ndarray],
    folder: str | Path,
    signature: str,
    shard_size: int = 8192,
    batch_size: int = 64,
    desc: str = "embed",
    num_workers: int = 0,
) -> Embeddings:
    """Embed ``settings``' images into ``folder``/shard-*.safetensors, skipping shards already there.

    ``embed`` maps a list of RGB images to an (n, d) array; ``signature`` names it (model and
    preprocessing) so that shards from another model are never mixed in. With ``num_workers`` > 0,
    DataLoader workers decode (and, for an embedder with ``preprocess``/``forward``, preprocess).
    """
    folder = Path(folder)
    source = {k: v for k, v in to_dict(settings).items() if k not in ("label_column", "id_column")}
    _check_signature(folder, {"embedder": signature, "source": source, "shard_size": shard_size})
    if not (folder / COMPLETE).is_file():
        _embed_missing_shards(settings, embed, folder, shard_size, batch_size, desc, num_workers)
    return load_embeddings(folder)


class _ShardReader(torch.utils.data.IterableDataset):
    """Decodes (and preprocesses) the rows of the shards still to embed, in batches.

    DataLoader worker ``w`` of ``W`` takes the shards ``s`` with ``s % W == w``: every worker walks
    the undecoded rows (cheap) so positions stay global, and decodes only its own shards' rows.
    It yields ``("batch", shard, positions, hashes, images)``, ``("shard", shard, rows, skipped)``
    when a shard is complete, and ``("end", rows)`` at the end of the source.
    """

    def __init__(self, settings: SourceSettings, shard_size: int, batch_size: int, done: set[int],
                 preprocess: Callable | None) -> None:
        super().__init__()
        self.settings, self.shard_size, self.batch_size = settings, shard_size, batch_size
        self.done, self.preprocess = done, preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = lambda shard: shard % workers == worker and shard not in self.done  # noqa: E731
        column, images, positions, hashes = self.settings.image_column, [], [], []
        max_pixels = self.settings.max_image_pixels
        current, skipped, rows = 0, 0, 0

        def batch():
            payload = self.preprocess(images) if self.preprocess else list(images)
            message = ("batch", current, np.asarray(positions, np.int64), np.stack(hashes), payload)
            images.clear()
            positions.clear()
            hashes.clear()
            return message

        for position, example in iter_rows(self.settings):
            rows = position + 1
            shard = position // self.shard_size
            if shard != current:
                if mine(current):
                    if images:
                        yield batch()
                    yield ("shard", current, self.shard_size, skipped)  # rows arrive in order: shard == current + 1
                current, skipped = shard, 0
            if not mine(shard):
                continue  # finished by an earlier run, or another worker's: not decoded
            data = encoded_bytes(example[column])
            try:
                image = open_rgb(data if data else image_source(example[column]), max_pixels=max_pixels)
            except ImageDecodeError:
                skipped += 1
                continue
            images.append(image)
            positions.append(position)
            hashes.append(content_hash(data))
            if len(images) >= self.batch_size:
                yield batch()
        if rows and mine(current):
            if images:
                yield batch()
            yield ("shard", current, rows - current * self.shard_size, skipped)
        yield ("end", rows)


def _embed_missing_shards(settings, embed, folder: Path, shard_size: int, batch_size: int, desc: str,
                          num_workers: int = 0) -> None:
    done = {int(p.stem.split("-")[1]) for p in folder.glob("shard-*.safetensors")}
    # An embedder with preprocess/forward (the backbone) preprocesses in the workers; others get images.
    preprocess = getattr(embed, "preprocess", None) if hasattr(embed, "forward") else None
    forward = embed.forward if preprocess else embed
    reader = _ShardReader(settings, shard_size, batch_size, done, preprocess)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=num_workers)
    parts: dict[int, list] = {}
    rows = 0
    with tqdm(total=settings.limit, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for message in loader:
            if message[0] == "batch":
                _, shard, positions, hashes, payload = message
                parts.setdefault(shard, []).append((np.asarray(forward(payload), dtype=np.float32), positions, hashes))
                bar.update(len(positions))
            elif message[0] == "shard":
                _, shard, shard_rows, skipped = message
                _write_shard(folder, shard, parts.pop(shard, []), shard_rows, skipped)
                bar.update(skipped)
                bar.set_postfix(shards=shard + 1, refresh=False)
            else:
                rows = max(rows, message[1])
    (folder / COMPLETE).write_text(json.dumps({"rows": rows}))


def _write_shard(folder: Path, shard: int, parts: list, rows: int, skipped: int) -> None:
    """One shard file, written under a temporary name and renamed: it is either complete or absent."""
    dim = parts[0][0].shape[1] if parts else 0
    tensors = {
        "vectors": np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, dim), np.float32),
        "positions": np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64),
        "hashes": np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, HASH_BYTES), np.uint8),
    }
    path = _shard_path(folder, shard)
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"rows": str(rows), "skipped": str(skipped)})
    os.replace(temporary, path)


def load_embeddings(folder: str | Path) -> Embeddings:
    """Concatenate the shards of a completed :func:`embed_source` run, in row order."""
    folder = Path(folder)
    complete = folder / COMPLETE
    if not complete.is_file():
        raise FileNotFoundError(f"{folder}: the embedding stage has not finished; rerun it to complete the missing shards.")
    rows = json.loads(complete.read_text())["rows"]
    vectors, positions, hashes, skipped, dim = [], [], [], 0, 0
    for path in sorted(folder.glob("shard-*.safetensors")):
        tensors = load_file(str(path))
        vectors.append(tensors["vectors"])
        positions.append(tensors["positions"])
        hashes.append(tensors["hashes"])
        dim = max(dim, tensors["vectors"].shape[1])
        with safe_open(str(path), "np") as handle:
            skipped += int(handle.metadata()["skipped"])
    vectors = [v if v.shape[1] == dim else np.zeros((0, dim), np.float32) for v in vectors]
    return Embeddings(
        vectors=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        positions=np.concatenate(positions) if positions else np.zeros(0, np.int64),
        hashes=np.concatenate(hashes) if hashes else np.zeros((0, HASH_BYTES), np.uint8),
        rows=rows,
        skipped=skipped,
    )
