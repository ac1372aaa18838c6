"""The embed stage: sharded, resumable after a kill, bad images skipped and counted, no mixing of models."""

import io

import numpy as np
import pytest
from curate_helpers import cifar_rows, write_images
from PIL import Image

from dinov2_hf.config_utils import ConfigError
from dinov2_hf.curate.config import EmbedSettings, SourceSettings
from dinov2_hf.curate.embed import BackboneEmbedder, embed_source, load_embeddings


class MeanColour:
    """A cheap deterministic embedder that counts the images it sees and can die mid-run."""

    signature = "mean-colour"

    def __init__(self, fail_after_batches: int | None = None) -> None:
        self.seen, self.batches, self.fail_after = 0, 0, fail_after_batches

    def __call__(self, images):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.seen += len(images)
        vectors = np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) + 1 for im in images])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def pool(cifar_dir, tmp_path):
    images = [r["image"]["bytes"] for r in cifar_rows(cifar_dir, "test", 0, 100)]
    images[7], images[55] = b"", b"not an image"  # undecodable rows are skipped and counted
    write_images(tmp_path / "pool" / "train-00000-of-00001.parquet", images)
    return SourceSettings(source=str(tmp_path / "pool"))


def test_killed_embed_resumes_without_recomputing_finished_shards(pool, tmp_path):
    reference = embed_source(pool, MeanColour(), tmp_path / "reference", "mean-colour", shard_size=32, batch_size=16)
    dying = MeanColour(fail_after_batches=5)  # 16-image batches: shards 0 and 1 (64 rows) complete, shard 2 not
    with pytest.raises(KeyboardInterrupt):
        embed_source(pool, dying, tmp_path / "run", "mean-colour", shard_size=32, batch_size=16)
    shards = sorted(p.name for p in (tmp_path / "run").glob("shard-*"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(FileNotFoundError, match="has not finished"):
        load_embeddings(tmp_path / "run")
    (tmp_path / "run" / "shard-00002.tmp").write_bytes(b"half a shard")  # as a kill during a write leaves it
    resumed = MeanColour()
    result = embed_source(pool, resumed, tmp_path / "run", "mean-colour", shard_size=32, batch_size=16)
    assert resumed.seen == 36  # rows 64..99 (shards 2 and 3), none of the finished shards
    assert result.rows == 100 and result.skipped == 2 and len(result.positions) == 98
    np.testing.assert_array_equal(result.positions, reference.positions)
    np.testing.assert_array_equal(result.vectors, reference.vectors)
    np.testing.assert_array_equal(result.hashes, reference.hashes)
    again = MeanColour()
    embed_source(pool, again, tmp_path / "run", "mean-colour", shard_size=32, batch_size=16)
    assert again.seen == 0  # a finished stage is not even read again


def test_embeddings_of_another_model_are_not_mixed_in(pool, tmp_path):
    embed_source(pool, MeanColour(), tmp_path / "run", "mean-colour", shard_size=32)
    with pytest.raises(ConfigError, match="embedder differ.*delete that folder"):
        embed_source(pool, MeanColour(), tmp_path / "run", "another model", shard_size=32)


def test_backbone_embedder_gives_normalised_cls_embeddings(cifar_dir):
    settings = EmbedSettings(preset="tiny", overrides={"layerscale_value": 1.0}, image_size=28)
    embedder = BackboneEmbedder(settings)
    assert embedder.model is None  # loaded on the first batch only
    images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in cifar_rows(cifar_dir, "test", 0, 4)]
    vectors = embedder(images)
    np.testing.assert_array_equal(vectors, BackboneEmbedder(settings)(images))  # seeded random weights
    assert vectors.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    pixels = embedder.processor(images, return_tensors="pt")["pixel_values"]
    expected = embedder.model(pixel_values=pixels).pooler_output.detach().numpy()
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


def test_worker_processes_write_the_same_shards(pool, tmp_path):
    """Two DataLoader workers (shards 0, 2 and 1, 3) give the same files as the main process alone."""
    single = embed_source(pool, MeanColour(), tmp_path / "single", "mean-colour", shard_size=32, batch_size=16)
    parallel = embed_source(pool, MeanColour(), tmp_path / "parallel", "mean-colour", shard_size=32, batch_size=16,
                            num_workers=2)
    for name in ("vectors", "positions", "hashes"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(single, name))
    assert (parallel.rows, parallel.skipped) == (single.rows, single.skipped) == (100, 2)
    settings = EmbedSettings(preset="tiny", overrides={"layerscale_value": 1.0}, image_size=28)
    backbone = embed_source(pool, BackboneEmbedder(settings), tmp_path / "backbone", "tiny", shard_size=32,
                            batch_size=16, num_workers=2)  # preprocessing in the workers, the model in the main process
    raw = pq_rows(pool.source)
    direct = BackboneEmbedder(settings)([Image.open(io.BytesIO(raw[i]["bytes"])) for i in backbone.positions[:16]])
    np.testing.assert_allclose(backbone.vectors[:16], direct, atol=1e-5)


def pq_rows(folder):
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted(__import__("pathlib").Path(folder).glob("*.parquet"))[0]).to_pylist()
    return [r["image"] for r in rows]


def test_oversized_images_are_skipped_and_counted(tmp_path):
    from test_decode import png_header

    small = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    large = Image.new("RGB", (40, 40), (0, 200, 0))
    images = []
    for image in (small[0], large, small[1], small[2], small[3]):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    images.insert(2, png_header(20_000, 20_000))  # a decompression bomb's header: over every limit
    write_images(tmp_path / "pool" / "train-00000-of-00001.parquet", images)
    for limit, kept in ((None, [0, 1, 3, 4, 5]), (1000, [0, 3, 4, 5])):
        extra = {} if limit is None else {"max_image_pixels": limit}
        settings = SourceSettings(source=str(tmp_path / "pool"), **extra)
        result = embed_source(settings, MeanColour(), tmp_path / f"emb-{limit}", "mean-colour", shard_size=4,
                              batch_size=2)
        assert result.positions.tolist() == kept and result.skipped == len(images) - len(kept)
