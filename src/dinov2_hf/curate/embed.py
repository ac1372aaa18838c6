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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ..config_utils import ConfigError, to_dict
from ..data.decode import ImageDecodeError, open_rgb
from ..data.sources import DataSettings, image_source, load_image_stream
from .config import EmbedSettings, SourceSettings

HASH_BYTES = 16
COMPLETE = "complete.json"


def iter_rows(settings: SourceSettings) -> Iterator[tuple[int, dict]]:
    """(position, example) for each row of ``settings`` in the source's own order; images undecoded."""
    data = DataSettings(
        source=settings.source,
        format=settings.format,
        split=settings.split,
        image_column=settings.image_column,
        label_column=settings.label_column,
        shuffle_buffer=0,  # a fixed order: positions are the ids that later stages refer to
    )
    stream = load_image_stream(data)
    columns = stream.column_names or []
    if settings.id_column and columns and settings.id_column not in columns:
        raise ConfigError(f"id_column={settings.id_column!r} is not a column of {settings.source!r}; columns: {columns}.")
    if settings.limit is not None:
        stream = stream.take(settings.limit)
    yield from enumerate(stream)


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
        self.settings, self.seed = settings, seed
        self.resize = settings.resize_size or round(settings.image_size * 256 / 224)
        source = settings.model if settings.model is not None else f"random {settings.preset} {settings.overrides} seed {seed}"
        # What makes two embedding runs comparable: a rerun with another signature must not reuse shards.
        self.signature = f"{source} | crop {settings.image_size} resize {self.resize} | {settings.dtype}"
        self.model = None

    def load(self) -> None:
        from ..modeling import Dinov2HFConfig, Dinov2HFModel, dinov2_image_processor
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
        self.processor = dinov2_image_processor(crop_size=settings.image_size, resize_size=self.resize)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self.model is None:
            self.load()  # outside inference mode: the weights stay ordinary tensors
        pixels = self.processor(list(images), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            features = self.model(pixel_values=pixels).pooler_output.float()
            return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


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
) -> Embeddings:
    """Embed ``settings``' images into ``folder``/shard-*.safetensors, skipping shards already there.

    ``embed`` maps a list of RGB images to an (n, d) array; ``signature`` names it (model and
    preprocessing) so that shards from another model are never mixed in.
    """
    folder = Path(folder)
    source = {k: v for k, v in to_dict(settings).items() if k not in ("label_column", "id_column")}
    _check_signature(folder, {"embedder": signature, "source": source, "shard_size": shard_size})
    if not (folder / COMPLETE).is_file():
        _embed_missing_shards(settings, embed, folder, shard_size, batch_size, desc)
    return load_embeddings(folder)


def _embed_missing_shards(settings, embed, folder: Path, shard_size: int, batch_size: int, desc: str) -> None:
    done = {int(p.stem.split("-")[1]) for p in folder.glob("shard-*.safetensors")}
    image_column = settings.image_column
    vectors, positions, hashes, pending_images, pending = [], [], [], [], []
    skipped, current, rows = 0, 0, 0

    def run_batch():
        if pending_images:
            vectors.append(np.asarray(embed(pending_images), dtype=np.float32))
            positions.extend(p for p, _ in pending)
            hashes.extend(h for _, h in pending)
            pending_images.clear()
            pending.clear()

    def flush(shard: int, end: int):
        nonlocal vectors, positions, hashes, skipped
        run_batch()
        dim = vectors[0].shape[1] if vectors else 0
        tensors = {
            "vectors": np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
            "positions": np.asarray(positions, dtype=np.int64),
            "hashes": np.stack(hashes) if hashes else np.zeros((0, HASH_BYTES), np.uint8),
        }
        path = _shard_path(folder, shard)
        temporary = path.with_suffix(".tmp")
        save_file(tensors, str(temporary), metadata={"rows": str(end - shard * shard_size), "skipped": str(skipped)})
        os.replace(temporary, path)  # atomic: a shard file is either complete or absent
        vectors, positions, hashes, skipped = [], [], [], 0

    total = settings.limit
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for position, example in iter_rows(settings):
            rows = position + 1
            shard = position // shard_size
            if shard != current:
                if current not in done:
                    flush(current, shard * shard_size)
                current = shard
            bar.update(1)
            if shard in done:
                continue  # finished by an earlier run: not decoded, not embedded
            data = encoded_bytes(example[image_column])
            try:
                image = open_rgb(data if data else image_source(example[image_column]))
            except ImageDecodeError:
                skipped += 1
                continue
            pending_images.append(image)
            pending.append((position, content_hash(data)))
            if len(pending_images) >= batch_size:
                run_batch()
            bar.set_postfix(skipped=skipped, refresh=False)
    if rows and current not in done:
        flush(current, rows)
    (folder / COMPLETE).write_text(json.dumps({"rows": rows}))


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
