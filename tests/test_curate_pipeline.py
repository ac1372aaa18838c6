"""The whole pipeline on CIFAR-10: what it writes streams through the trainer's data source, reruns
skip finished stages, and bad settings fail before any work with a message naming the key."""

import csv
import random

import faiss
import numpy as np
import pytest
from curate_helpers import ThumbnailEmbedder, augmented_copy, cifar_rows, write_images

from dinov2_hf.cli import main
from dinov2_hf.config_utils import ConfigError
from dinov2_hf.curate.config import load_curate_config
from dinov2_hf.curate.embed import load_embeddings
from dinov2_hf.curate.pipeline import run_curation
from dinov2_hf.data.sources import DataSettings, MultiCropStream, load_image_stream
from dinov2_hf.data.transforms import MultiCropGeometry, MultiCropSettings

faiss.omp_set_num_threads(2)


class Counting(ThumbnailEmbedder):
    def __call__(self, images):
        self.seen = getattr(self, "seen", 0) + len(images)
        return super().__call__(images)


@pytest.fixture
def sources(cifar_dir, tmp_path):
    """A pool of 400 CIFAR test images + 20 exact copies + 20 copies of eval images + 10 copies of
    curated images; 30 curated seeds."""
    rows = cifar_rows(cifar_dir, "test", 3000, 500)
    pool = [r["image"]["bytes"] for r in rows[:400]]
    labels = [r["label"] for r in rows[:400]]
    evaluation = [r["image"]["bytes"] for r in rows[400:]]
    seeds = [r["image"]["bytes"] for r in cifar_rows(cifar_dir, "train", 0, 30)]
    rng = random.Random(0)
    pool_images = pool + pool[:20] + [augmented_copy(e, rng) for e in evaluation[:20]] + seeds[:5] + [augmented_copy(e, rng) for e in seeds[5:10]]
    write_images(tmp_path / "pool" / "train-00000-of-00001.parquet", pool_images, labels + labels[:20] + [-1] * 30)
    write_images(tmp_path / "eval" / "test-00000-of-00001.parquet", evaluation)
    write_images(tmp_path / "seeds" / "train-00000-of-00001.parquet", seeds)
    return tmp_path


def overrides(root, **extra):
    values = {
        "pool.source": root / "pool", "pool.label_column": "label",
        "curated.source": root / "seeds",
        "eval_sets": f"[{{source: {root / 'eval'}, split: test}}]",
        "embed.shard_size": 128, "retrieve.k": 8,
        "cluster.levels": "[30, 6, 2]", "cluster.resampling_steps": "[1, 3, 3]", "cluster.sample_sizes": "[1, 3, 2]",
        "sample.target_size": 100, "output.output_dir": root / "out", "output.shard_size_mb": 0.05,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_pipeline_output_streams_through_the_trainer_data_source(sources, cifar_dir):
    config = load_curate_config(None, overrides(sources))
    embedder = Counting([r["image"]["bytes"] for r in cifar_rows(cifar_dir, "train", 1000, 1000)])
    result = run_curation(config, embedder)
    counts = result.counts
    print("\n", counts)
    assert counts["pool rows"] == 450 and counts["exact duplicates removed"] == 20
    assert counts["eval-set copies removed"] >= 18 and counts["curated copies removed"] >= 9
    assert counts["sampled"] == 100 and counts["curated written"] == 30 and counts["written"] == 130
    assert len(result.shards) > 1  # 0.05 MB shards

    # The trainer's source reads the folder; MultiCropStream decodes and crops every image.
    stream = load_image_stream(DataSettings(source=str(result.output_dir), label_column="label", shuffle_buffer=0))
    geometry = MultiCropGeometry(MultiCropSettings(global_crops_size=28, local_crops_size=14, local_crops_number=2), seed=0)
    samples = list(MultiCropStream(stream, geometry, "image", "label"))
    assert len(samples) == 130 and sum(s["skipped"] for s in samples) == 0
    rows = list(load_image_stream(DataSettings(source=str(result.output_dir), shuffle_buffer=0)))
    with open(result.manifest) as handle:
        manifest = list(csv.DictReader(handle))
    assert [(r["source"], r["position"]) for r in rows] == [(m["source"], int(m["position"])) for m in manifest]

    # Written pool rows: no exact copy (rows 400-419 repeat rows 0-19), no eval copy (rows 420-439).
    written = np.array([r["position"] for r in rows if r["source"] == "pool"])
    assert not np.isin(written, np.arange(400, 420)).any()
    assert np.isin(written, np.arange(420, 440)).sum() <= 2
    assert np.isin(written, np.arange(440, 450)).sum() <= 1  # the curated images are written themselves
    # ... and each was retrieved for a curated image (the exact neighbours: next test).
    assert {int(m["retrieved_for"]) for m in manifest if m["source"] == "pool"} <= set(range(30))
    assert counts["retrieved"] <= 30 * 8

    # The card names the counts; datasets loads the folder (the layout push_to_hub writes).
    card = (sources / "out" / "README.md").read_text()
    assert "| after dedup |" in card and "path: data/train-*" in card
    from datasets import load_dataset

    assert load_dataset(str(result.output_dir), split="train").num_rows == 130

    # A rerun reads nothing again; a new target size redoes only the sampling.
    embedder.seen = 0
    again = run_curation(config, embedder)
    assert embedder.seen == 0 and again.counts == counts
    smaller = run_curation(load_curate_config(None, overrides(sources, **{"sample.target_size": 50})), embedder)
    assert embedder.seen == 0 and smaller.counts["sampled"] == 50 and smaller.counts["written"] == 80


def test_retrieved_images_are_true_nearest_neighbours(sources, cifar_dir):
    config = load_curate_config(None, overrides(sources, **{"sample.target_size": 0, "dedup.near": False,
                                                            "output.include_curated": False}))
    embedder = ThumbnailEmbedder([r["image"]["bytes"] for r in cifar_rows(cifar_dir, "train", 1000, 1000)])
    result = run_curation(config, embedder)
    pool = load_embeddings(sources / "out" / "work" / "embeddings" / "pool")
    seeds = load_embeddings(sources / "out" / "work" / "embeddings" / "curated")
    keep = np.load(sources / "out" / "work" / "dedup.npz")["keep"]
    similarities = seeds.vectors.astype(np.float64) @ pool.vectors[keep].T.astype(np.float64)
    expected = set(pool.positions[keep][np.argsort(-similarities, axis=1)[:, :8]].reshape(-1).tolist())
    with open(result.manifest) as handle:
        written = {int(m["position"]) for m in csv.DictReader(handle) if m["source"] == "pool"}
    assert written == expected and result.counts["retrieved"] == len(expected)


@pytest.mark.parametrize("extra, message", [
    (["sample.target=5"], "Unknown config key(s) in sample: target"),
    (["cluster.levels=[10, 5]"], "need one value per level"),
    (["cluster.levels=[5, 10, 20]"], "non-increasing"),
    (["dedup.threshold=1.5"], "not a cosine similarity"),
    (["embed.batch_size=big"], "embed.batch_size: expected an integer"),
    (["pool.shuffle_buffer=100"], "pool.shuffle_buffer=100: curate reads sources in a fixed order"),
    (["embed.preset=vitx14"], "Unknown preset 'vitx14'"),
])
def test_bad_settings_fail_naming_the_key(extra, message):
    with pytest.raises(ConfigError) as error:
        load_curate_config(None, ["pool.source=images"] + extra)
    assert message in str(error.value)


def test_cli_reports_a_missing_source_before_loading_a_model(tmp_path, monkeypatch, capsys, cifar_dir):
    monkeypatch.chdir(tmp_path)
    wrong_column = ["curate", f"pool.source={cifar_dir / 'test-00000-of-00001.parquet'}", "pool.image_column=img"]
    assert main(wrong_column) == 2
    assert "pool.image_column='img' is not a column" in capsys.readouterr().err
    assert main(["curate", "pool.source=./missing-folder", "embed.preset=tiny"]) == 2
    error = capsys.readouterr().err
    assert "pool:" in error and "missing-folder" in error
    assert main(["curate", "pool.source=./missing-folder", "embed.model=./missing-model"]) == 2  # checked first
    assert "embed.model=./missing-model does not exist" in capsys.readouterr().err
    assert main(["curate"]) == 2
    assert "pool.source is empty" in capsys.readouterr().err
    assert main(["curate", "pool.source=someone/no-such-dataset"]) == 2  # tests run with HF_HUB_OFFLINE=1
    assert "pool.source='someone/no-such-dataset'" in capsys.readouterr().err


def test_image_folder_pool_and_yaml_config(cifar_dir, tmp_path):
    """Images read from files (the path branch of every stage), settings from a YAML file plus overrides."""
    folder = tmp_path / "images"
    folder.mkdir()
    images = [r["image"]["bytes"] for r in cifar_rows(cifar_dir, "test", 5000, 40)]
    for i, data in enumerate(images + images[:5]):  # the last 5 files repeat the first 5 byte for byte
        (folder / f"{i:03d}.jpg").write_bytes(data)
    (tmp_path / "curate.yaml").write_text(
        f"pool:\n  source: {folder}\nembed:\n  shard_size: 16\noutput:\n  output_dir: {tmp_path / 'out'}\n"
    )
    config = load_curate_config(tmp_path / "curate.yaml", ["dedup.near=false"])
    result = run_curation(config, ThumbnailEmbedder([r["image"]["bytes"] for r in cifar_rows(cifar_dir, "train", 0, 500)]))
    assert result.counts["pool rows"] == 45 and result.counts["exact duplicates removed"] == 5
    rows = list(load_image_stream(DataSettings(source=str(result.output_dir), shuffle_buffer=0)))
    assert sorted(r["image"]["bytes"] for r in rows) == sorted(images)
