"""Streaming sources: parquet, image folders, webdataset tars; bad images are skipped and counted."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2_hf.data import shutdown
from dinov2_hf.data.collate import MultiCropCollator
from dinov2_hf.data.sources import DataSettings, MultiCropStream, load_image_stream, resolve_source
from dinov2_hf.data.transforms import MultiCropGeometry, MultiCropSettings

SETTINGS = MultiCropSettings(global_crops_size=28, local_crops_size=14, local_crops_number=2)


def png(seed: int, size=(20, 24)) -> bytes:
    array = (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


BAD = [b"", b"not an image", png(99)[:40]]  # empty, garbage, truncated


def write_parquet(folder, shards=2, per_shard=6):
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard in range(shards):
        images, labels = [], []
        for i in range(per_shard):
            data = BAD[i % len(BAD)] if (shard == 0 and i < len(BAD)) else png(index)
            images.append({"bytes": data, "path": None})
            labels.append(index)
            index += 1
        table = pa.table({"image": images, "label": labels})
        pq.write_table(table, folder / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return index


def collect(stream: MultiCropStream):
    samples = list(stream)
    return samples, sum(s["skipped"] for s in samples)


def test_parquet_stream_skips_and_counts_bad_images(tmp_path):
    total = write_parquet(tmp_path / "data")
    settings = DataSettings(source=str(tmp_path / "data"), label_column="label", shuffle_buffer=4)
    stream = MultiCropStream(load_image_stream(settings, seed=0), MultiCropGeometry(SETTINGS, seed=0), "image", "label")
    samples, _ = collect(stream)
    labels = sorted(s["labels"] for s in samples)
    assert len(samples) == total - len(BAD)
    assert labels == [i for i in range(total) if i >= len(BAD)]
    assert sum(s["skipped"] for s in samples) == len(BAD)
    batch = MultiCropCollator(28, 14, seed=0)(samples[:4])
    assert batch["global_crops"].shape == (8, 3, 28, 28) and batch["labels"].shape == (4,)


def test_skipped_count_is_exact_without_shuffling(tmp_path):
    total = write_parquet(tmp_path / "data", shards=1, per_shard=8)
    settings = DataSettings(source=str(tmp_path / "data"), shuffle_buffer=0)
    samples, skipped = collect(MultiCropStream(load_image_stream(settings), MultiCropGeometry(SETTINGS, seed=0)))
    assert len(samples) == total - len(BAD) and skipped == len(BAD)


def test_split_by_node_gives_disjoint_complete_halves(tmp_path):
    total = write_parquet(tmp_path / "data", shards=2, per_shard=6)
    settings = DataSettings(source=str(tmp_path / "data"), label_column="label", shuffle_buffer=0)
    seen = []
    for rank in range(2):
        stream = MultiCropStream(load_image_stream(settings, rank=rank, world_size=2), MultiCropGeometry(SETTINGS), "image", "label")
        seen.append({s["labels"] for s in stream})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {i for i in range(total) if i >= len(BAD)}


def test_image_folder_with_corrupt_files(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "images" / label / f"{i}.png").write_bytes(png(i))
    (tmp_path / "images" / "cats" / "empty.jpg").write_bytes(b"")
    (tmp_path / "images" / "dogs" / "broken.png").write_bytes(b"\x89PNG broken")
    settings = DataSettings(source=str(tmp_path / "images"), label_column="label", shuffle_buffer=0)
    assert resolve_source(settings)[0] == "imagefolder"
    samples, skipped = collect(MultiCropStream(load_image_stream(settings), MultiCropGeometry(SETTINGS), "image", "label"))
    assert len(samples) == 6 and skipped == 2
    assert sorted({s["labels"] for s in samples}) == [0, 1]


def test_webdataset_tars(tmp_path):
    tar_path = tmp_path / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(5):
            for suffix, data in ((".png", png(i)), (".cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"sample{i:03d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    settings = DataSettings(source=str(tar_path), image_column="png", label_column="cls", shuffle_buffer=0)
    assert resolve_source(settings)[0] == "webdataset"
    samples, skipped = collect(MultiCropStream(load_image_stream(settings), MultiCropGeometry(SETTINGS), "png", "cls"))
    assert len(samples) == 5 and skipped == 0


def test_bad_sources_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="data.source is empty"):
        resolve_source(DataSettings(source=""))
    with pytest.raises(FileNotFoundError, match="no parquet shards, tar shards or images"):
        resolve_source(DataSettings(source=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        resolve_source(DataSettings(source=str(tmp_path / "empty")))
    write_parquet(tmp_path / "data", shards=1, per_shard=4)
    with pytest.raises(ValueError, match="data.image_column='img' is not a column"):
        load_image_stream(DataSettings(source=str(tmp_path / "data"), image_column="img"))
    assert resolve_source(DataSettings(source="someuser/some-dataset"))[0] == "someuser/some-dataset"


def test_arrow_threads_finish_defers_datasets_waits_to_one_wait_at_exit_even_when_the_body_raises(monkeypatch):
    from datasets import config as datasets_config

    calls = []
    monkeypatch.setattr(shutdown.gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(shutdown.atexit, "register", lambda function: calls.append(("at exit", function)))
    monkeypatch.setattr(shutdown, "_wait_registered", False)
    monkeypatch.setattr(datasets_config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 5)
    with shutdown.arrow_threads_finish():
        calls.append(("body", datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN))  # datasets' own sleeps are off
    assert calls == [("body", 0), "collect", ("at exit", shutdown._wait_for_arrow_threads)]
    assert datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN == 5
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # the body's exception propagates, after the collection
        with shutdown.arrow_threads_finish():
            calls.append("body")
            raise KeyboardInterrupt
    assert calls == ["body", "collect"]  # the exit wait is registered once per process
    assert datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN == 5
    monkeypatch.setattr(shutdown.time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    shutdown._wait_for_arrow_threads()
    assert calls[-1] == ("sleep", 5)


def test_oversized_images_are_skipped_and_counted_not_a_crash(tmp_path):
    from test_decode import png_header

    # A 20,000 x 20,000 header (over the default limit and PIL's bomb threshold) and a 40x40 image over a
    # lowered data.max_image_pixels, among good 20x24 images.
    rows = [png(0), png_header(20_000, 20_000), png(1), png(2, size=(40, 40)), png(3)]
    folder = tmp_path / "data"
    folder.mkdir()
    table = pa.table({"image": [{"bytes": data, "path": None} for data in rows], "label": list(range(len(rows)))})
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    for limit, kept in ((None, [0, 2, 3, 4]), (1000, [0, 2, 4])):
        settings = DataSettings(source=str(folder), label_column="label", shuffle_buffer=0,
                                **({} if limit is None else {"max_image_pixels": limit}))
        stream = MultiCropStream(load_image_stream(settings), MultiCropGeometry(SETTINGS, seed=0), "image", "label",
                                 max_pixels=settings.max_image_pixels)
        samples, skipped = collect(stream)
        assert [s["labels"] for s in samples] == kept and skipped == len(rows) - len(kept)
    with pytest.raises(ValueError, match="data.max_image_pixels must be a positive pixel count"):
        load_image_stream(DataSettings(source=str(folder), max_image_pixels=0))
