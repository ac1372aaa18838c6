"""Configuration of ``dinov2-hf curate``: dataclasses loaded from YAML plus ``a.b=value`` overrides.

Unknown keys and wrong types fail before any work, naming the key (see :mod:`dinov2_hf.config_utils`);
:func:`CurateConfig.validate` then checks the values that only make sense together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ..data.sources import DataSettings
from ..modeling.configuration_dinov2_hf import check_overrides, check_preset


@dataclass
class SourceSettings(DataSettings):
    """One image source (the trainer's ``data:`` fields), read with
    :func:`dinov2_hf.data.sources.load_image_stream` in a fixed order: positions are the ids later stages use."""

    shuffle_buffer: int = 0  # must stay 0 (CurateConfig.validate): a fixed order
    id_column: str | None = None  # carried into the manifest when set
    limit: int | None = None  # read only the first ``limit`` rows (quick runs)


@dataclass
class EmbedSettings:
    """The backbone that embeds every image (its L2-normalised CLS token)."""

    model: str | None = None  # checkpoint folder, Meta .pth or Hub id; None: random ``preset`` (tests)
    preset: str = "vits14"
    overrides: dict = field(default_factory=dict)  # config fields of the random ``preset``, e.g. num_hidden_layers
    image_size: int = 224  # center crop
    resize_size: int | None = None  # shortest edge before the crop; default resize_for_crop(image_size): 256 for 224
    batch_size: int = 64
    num_workers: int = 0  # DataLoader workers that decode and preprocess (0: in the main process)
    shard_size: int = 8192  # rows per embedding shard: the unit of resumption
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        check_preset(self.preset)
        check_overrides(self.overrides, "embed.overrides")


@dataclass
class DedupSettings:
    """Exact (content hash) and near-duplicate (embedding cosine) removal, and eval-set leakage."""

    exact: bool = True
    near: bool = True
    # Cosine similarities at or above which images count as copies. They depend on the embedding model:
    # 0.8 finds >= 0.9 of planted copies at >= 0.9 precision with the whitened test descriptor (tests).
    threshold: float = 0.80  # between two pool images
    k: int = 32  # most partners kept per image and list: bounds memory in big clusters of copies
    nprobe: int = 4  # lists visited per image (pools over 20k): a copy sits in its original's list or the next ones
    eval_threshold: float = 0.80  # between a pool image and an evaluation image (the pool image goes)


@dataclass
class IndexSettings:
    """faiss index: exact inner product for small collections, IVF (approximate) for large ones."""

    kind: Literal["auto", "flat", "ivf"] = "auto"
    ivf_min_size: int = 200_000  # "auto" switches to IVF from this many database vectors
    nlist: int | None = None  # IVF lists (also dedup's self-join lists); default ~4 sqrt(n)
    nprobe: int = 16


@dataclass
class RetrieveSettings:
    """For each curated image, its k nearest pool images (the LVD-142M retrieval step)."""

    k: int = 4


@dataclass
class ClusterSettings:
    """Hierarchical k-means with resampling (Vo et al., 2024); level 1 clusters the images."""

    levels: list[int] = field(default_factory=lambda: [1000, 100, 10])
    resampling_steps: list[int] = field(default_factory=lambda: [1, 5, 5])
    sample_sizes: list[int] = field(default_factory=lambda: [1, 5, 3])  # points per cluster in a resampling step
    iterations: int = 20
    max_points_per_centroid: int = 256  # k-means trains on a subsample of this many points per cluster (faiss)


@dataclass
class SampleSettings:
    """Balanced top-down sampling of ``target_size`` images from the cluster tree."""

    target_size: int = 0  # 0: keep every candidate (no clustering)
    strategy: Literal["closest", "random"] = "random"  # how leaves are sampled


@dataclass
class OutputSettings:
    output_dir: str = "curated"
    shard_size_mb: float = 256.0  # target size of each parquet shard of encoded images
    include_curated: bool = True  # also write the curated seed images (as LVD-142M does)
    name: str = ""  # dataset name in the card; default: the output folder's name


@dataclass
class CurateConfig:
    pool: SourceSettings = field(default_factory=SourceSettings)
    curated: SourceSettings | None = None
    eval_sets: list[SourceSettings] = field(default_factory=list)
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    retrieve: RetrieveSettings = field(default_factory=RetrieveSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    seed: int = 0

    def validate(self) -> CurateConfig:
        """Check values that the types alone cannot; raise :class:`ConfigError` naming key and fix."""
        if not self.pool.source:
            raise ConfigError("pool.source is empty: give the uncurated images (folder, parquet/tar files or a Hub id).")
        if self.curated is not None and not self.curated.source:
            raise ConfigError("curated.source is empty: give the curated seed images, or remove the curated section.")
        for i, settings in enumerate(self.eval_sets):
            if not settings.source:
                raise ConfigError(f"eval_sets[{i}].source is empty.")
        named = [("pool", self.pool), ("curated", self.curated)] + [(f"eval_sets[{i}]", s) for i, s in enumerate(self.eval_sets)]
        for name, settings in named:
            if settings is not None and settings.shuffle_buffer != 0:
                raise ConfigError(f"{name}.shuffle_buffer={settings.shuffle_buffer}: curate reads sources in a fixed "
                                  "order (positions are the images' ids); remove the key.")
        for name in ("threshold", "eval_threshold"):
            value = getattr(self.dedup, name)
            if not -1.0 <= value <= 1.0:
                raise ConfigError(f"dedup.{name}={value} is not a cosine similarity in [-1, 1].")
        levels = self.cluster
        if not (len(levels.levels) == len(levels.resampling_steps) == len(levels.sample_sizes)):
            raise ConfigError(
                "cluster.levels, cluster.resampling_steps and cluster.sample_sizes need one value per level; got "
                f"{len(levels.levels)}, {len(levels.resampling_steps)} and {len(levels.sample_sizes)}."
            )
        if any(k < 1 for k in levels.levels) or list(levels.levels) != sorted(levels.levels, reverse=True):
            raise ConfigError(f"cluster.levels={levels.levels}: positive and non-increasing (level 1 is the finest).")
        for name in ("batch_size", "shard_size", "image_size"):
            if getattr(self.embed, name) < 1:
                raise ConfigError(f"embed.{name} must be positive.")
        if self.sample.target_size < 0:
            raise ConfigError("sample.target_size must be >= 0 (0 keeps every candidate).")
        if self.retrieve.k < 1 or self.dedup.k < 1:
            raise ConfigError("retrieve.k and dedup.k must be positive.")
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


def load_curate_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurateConfig:
    """A validated :class:`CurateConfig` from an optional YAML file plus ``a.b=value`` overrides."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(CurateConfig, data).validate()
