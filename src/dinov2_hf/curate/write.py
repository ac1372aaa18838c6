"""Stage 5: write the selected images as parquet shards, with a dataset card and a manifest.

Layout (what ``datasets``' ``push_to_hub`` writes, so ``load_dataset(folder)``, the trainer's
``data.source=folder`` and ``HfApi.upload_folder`` all work)::

    <output_dir>/README.md                            dataset card: sources, counts per stage, parameters
    <output_dir>/data/train-00000-of-0000N.parquet    columns image (Image feature, original bytes), label, source, position, id
    <output_dir>/manifest.csv                         one line per image: provenance (source, row, id, stage, cluster, ...)

Images keep their original encoded bytes: no re-encoding loss. Shards are filled up to
``shard_size_mb`` of image bytes, written under temporary names and renamed once all are done.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import yaml
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from huggingface_hub import DatasetCard, DatasetCardData
from tqdm.auto import tqdm

from .config import SourceSettings
from .embed import encoded_bytes, iter_rows

FEATURES = Features(
    {"image": ImageFeature(), "label": Value("int64"), "source": Value("string"), "position": Value("int64"), "id": Value("string")}
)


@dataclass
class SourceSelection:
    """Rows to write from one source, with their provenance for the manifest."""

    name: str
    settings: SourceSettings
    positions: np.ndarray  # sorted source rows
    provenance: dict[str, np.ndarray] = field(default_factory=dict)  # extra manifest columns, aligned with positions


def _selected_rows(selection: SourceSelection):
    """(row index in selection, example) for the selected rows, reading the source only as far as needed."""
    wanted = {int(p): i for i, p in enumerate(selection.positions)}
    last = int(selection.positions[-1]) if len(selection.positions) else -1
    for position, example in iter_rows(selection.settings):
        if position > last:
            break
        if position in wanted:
            yield wanted[position], example


def write_dataset(selections: list[SourceSelection], output_dir: str | Path, shard_size_mb: float = 256.0) -> dict:
    """Write the shards and the manifest; returns {"images": n, "shards": [...], "manifest": path}."""
    output_dir = Path(output_dir)
    staging = output_dir / "data.partial"
    if staging.exists():
        shutil.rmtree(staging)  # leftovers of a killed write: this stage restarts as a whole
    staging.mkdir(parents=True)
    limit = shard_size_mb * 1e6
    columns = {name: [] for name in FEATURES}
    manifest: dict[str, list] = {"source": [], "position": [], "id": [], "label": []}
    extra = sorted({key for s in selections for key in s.provenance})
    manifest.update({key: [] for key in extra})
    shards, shard_bytes, written = [], 0, 0

    def flush():
        nonlocal shard_bytes, columns
        if columns["image"]:
            path = staging / f"shard-{len(shards):05d}.parquet"
            Dataset.from_dict(columns, features=FEATURES).to_parquet(str(path))
            shards.append(path)
        columns, shard_bytes = {name: [] for name in FEATURES}, 0

    total = sum(len(s.positions) for s in selections)
    with tqdm(total=total, desc="write", unit="img", dynamic_ncols=True) as bar:
        for selection in selections:
            settings = selection.settings
            for row, example in _selected_rows(selection):
                data = encoded_bytes(example[settings.image_column])
                label = int(example[settings.label_column]) if settings.label_column else -1
                identifier = str(example[settings.id_column]) if settings.id_column else ""
                position = int(selection.positions[row])
                for name, value in (("image", {"bytes": data, "path": None}), ("label", label), ("source", selection.name),
                                    ("position", position), ("id", identifier)):
                    columns[name].append(value)
                for name, value in (("source", selection.name), ("position", position), ("id", identifier), ("label", label)):
                    manifest[name].append(value)
                for key in extra:
                    values = selection.provenance.get(key)
                    manifest[key].append(values[row].item() if values is not None else None)
                shard_bytes += len(data)
                written += 1
                bar.update(1)
                if shard_bytes >= limit:
                    flush()
    flush()
    final = output_dir / "data"
    if final.exists():
        shutil.rmtree(final)
    names = []
    for i, path in enumerate(shards):
        name = f"train-{i:05d}-of-{len(shards):05d}.parquet"
        os.replace(path, staging / name)
        names.append(name)
    os.replace(staging, final)
    manifest_path = output_dir / "manifest.csv"
    pyarrow.csv.write_csv(pa.table(manifest), str(manifest_path))
    return {"images": written, "shards": [str(final / n) for n in names], "manifest": str(manifest_path)}


def write_card(output_dir: str | Path, name: str, counts: dict, sources: dict[str, str], parameters: dict) -> Path:
    """A dataset card (huggingface_hub ``DatasetCard``) with sources, counts per stage and parameters."""
    output_dir = Path(output_dir)
    data = DatasetCardData(
        pretty_name=name,
        task_categories=["image-feature-extraction"],
        tags=["dinov2", "self-supervised-learning", "data-curation"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
    )
    count_rows = "\n".join(f"| {key} | {value:,} |" for key, value in counts.items())
    source_rows = "\n".join(f"| {key} | `{value}` |" for key, value in sources.items())
    content = f"""---
{data.to_yaml()}
---

# {name}

Curated with `dinov2-hf curate` (dinov2_hf): embed, deduplicate (exact, near-duplicate, evaluation-set
copies), retrieve nearest pool images of curated seed images, hierarchical k-means with resampling and
balanced sampling (Vo et al., 2024), as for DINOv2's LVD-142M. Columns: `image`, `label` (-1 if none),
`source`, `position` (row in its source), `id`. Provenance of every image: `manifest.csv`.

## Sources

| name | source |
|---|---|
{source_rows}

## Counts per stage

| stage | images |
|---|---|
{count_rows}

## Parameters

```yaml
{yaml.safe_dump(parameters, sort_keys=False).strip()}
```
"""
    card = DatasetCard(content)
    path = output_dir / "README.md"
    card.save(str(path))
    return path
