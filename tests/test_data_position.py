"""Resuming mid-pass without replaying it: workers skip the rows they had consumed (not decoding them), crops are
seeded per row, and the batches come back in the uninterrupted order, for any number of workers."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_trainer import tiny_config

from dinov2_hf.data.position import DataPosition, continue_in_order
from dinov2_hf.training.trainer import Trainer


def loader_order(batches_per_worker: list[int], consumed: list[int]) -> list[tuple[int, int]]:
    """(worker, batch index) in the order a DataLoader yields them: a cycle over the workers from worker 0,
    passing over those that ran out, each worker starting after its ``consumed`` batches."""
    done, order = list(consumed), []
    while any(d < n for d, n in zip(done, batches_per_worker)):
        for worker, count in enumerate(batches_per_worker):
            if done[worker] < count:
                order.append((worker, done[worker]))
                done[worker] += 1
    return order


def test_continue_in_order_matches_the_uninterrupted_pass():
    rng = random.Random(0)
    for _ in range(500):
        workers = rng.randint(1, 4)
        counts = [rng.randint(0, 6) for _ in range(workers)]
        full = loader_order(counts, [0] * workers)
        cut = rng.randint(0, len(full))
        position = DataPosition()
        for worker, index in full[:cut]:
            position.advance(worker, index + 1)  # rows: one per batch here
        resumed = loader_order(counts, position.rows + [0] * (workers - len(position.rows)))
        batches = ({"worker": torch.tensor([w]), "index": i} for w, i in resumed)
        got = [(int(b["worker"][0]), b["index"]) for b in continue_in_order(batches, workers, position.last_worker)]
        assert got == full[cut:], (counts, cut)


def write_shards(cifar_dir, folder, sizes=(16, 56, 8), corrupt=(3, 20, 50)):
    """Uneven parquet shards (so the workers run out at different times) with a few undecodable images."""
    table = pq.read_table(cifar_dir / "test-00000-of-00001.parquet").slice(0, sum(sizes))
    images = table.column("image").to_pylist()
    for index in corrupt:
        images[index] = {"bytes": b"not an image", "path": None}
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for shard, size in enumerate(sizes):
        part = pa.table({"image": images[start : start + size], "label": table.column("label").to_pylist()[start : start + size]})
        pq.write_table(part, folder / f"train-{shard:05d}-of-{len(sizes):05d}.parquet")
        start += size
    return folder


@pytest.mark.slow
def test_skipped_rows_are_not_decoded_and_the_rest_is_unchanged(cifar_dir, tmp_path, monkeypatch):
    from dinov2_hf.data import sources
    from dinov2_hf.data.sources import DataSettings, MultiCropStream, load_image_stream
    from dinov2_hf.data.transforms import MultiCropGeometry, MultiCropSettings

    data = write_shards(cifar_dir, tmp_path / "data")
    settings = DataSettings(source=str(data), label_column="label", shuffle_buffer=16)
    crops = MultiCropSettings(global_crops_size=16, local_crops_size=8, local_crops_number=1)

    def samples(skip=()):
        stream = load_image_stream(settings, seed=0)
        stream.set_epoch(1)
        return list(MultiCropStream(stream, MultiCropGeometry(crops), "image", "label", seed=7, skip_rows=skip))

    full = samples()
    assert sum(s["skipped"] for s in full) == 3 and full[-1]["rows"] == 80
    decoded = []
    open_rgb = sources.open_rgb
    monkeypatch.setattr(sources, "open_rgb",
                        lambda source, **kwargs: decoded.append(source) or open_rgb(source, **kwargs))
    cut = 30
    resumed = samples(skip=[full[cut - 1]["rows"]])
    assert len(decoded) == 80 - full[cut - 1]["rows"]  # only the rows after the position are decoded
    assert len(resumed) == len(full) - cut
    for a, b in zip(resumed, full[cut:]):
        assert torch.equal(torch.stack(a["global_crops"]), torch.stack(b["global_crops"]))
        assert torch.equal(torch.stack(a["local_crops"]), torch.stack(b["local_crops"]))
        assert (a["labels"], a["rows"], a["skipped"]) == (b["labels"], b["rows"], b["skipped"])


@pytest.mark.slow
def test_resume_with_two_workers_continues_the_trajectory(cifar_dir, tmp_path):
    """Two DataLoader workers over three uneven shards with bad images (a pass is 8 batches, one worker runs out
    first): runs stopped in the first (step 5) and in the second pass (step 11) resume onto the uninterrupted
    run's losses and skipped-image counts."""
    data = write_shards(cifar_dir, tmp_path / "data")
    extra, settings = ("schedule.epochs=8",), {"num_workers": 2, "batch_size_per_device": 8}
    full = Trainer(tiny_config(data, tmp_path / "full", extra, **settings)).train().history
    for stop_at in (5, 11):
        output = tmp_path / f"resumed_{stop_at}"
        Trainer(tiny_config(data, output, extra, stop_at_step=stop_at, **settings)).train()
        resumed = Trainer(tiny_config(data, output, extra, **settings)).train().history
        assert [r["step"] for r in resumed] == list(range(stop_at, len(full)))
        for a, b in zip(resumed, full[stop_at:]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (stop_at, a["step"], a["loss"], b["loss"])
            assert a["skipped_images"] == b["skipped_images"]
