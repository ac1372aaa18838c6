"""Training batches: one DataLoader per pass over this rank's share of the stream, and their random seeds.

Crops are seeded per row from (seed, epoch, rank, worker, row); iBOT masks and photometric augmentation,
done on the device per micro-batch, from (seed, step, micro-batch, rank). So a run's batches depend on its
seed and position only, and a resumed pass skips the rows it had consumed without decoding them.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator

import torch
from accelerate import Accelerator

from ..data.collate import MultiCropCollator
from ..data.position import DataPosition, continue_in_order
from ..data.sources import MultiCropStream, load_image_stream
from ..data.transforms import BatchedPhotometric, MultiCropGeometry, MultiCropSettings
from ..objective.step import augment_batch
from .config import TrainConfig

DATA_STREAM, STEP_STREAM = 0, 1  # the per-epoch data seeds and the per-step augmentation seeds


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: a launcher stopping the process tree, or Ctrl-C reaching the
    whole process group, must not kill a worker under the training process, which finishes its step, writes its
    checkpoint and then shuts the workers down itself (they also exit when it dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Batches:
    """The batches of one rank: ``loader(epoch, crops)`` stacks crops in DataLoader workers, ``prepare``
    draws the masks and runs the photometric augmentation on the device."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator) -> None:
        self.config, self.accelerator = config, accelerator
        # Open the stream once now: a missing, empty or unreadable source fails here, in a moment, before the
        # model is built (the loader reopens it for every pass).
        load_image_stream(config.data, accelerator.process_index, accelerator.num_processes, config.train.seed)
        crops = config.crops
        self.photometric = BatchedPhotometric.for_crops(crops.global_crops_size, crops.blur, crops.blur_reference_size)

    def seed(self, stream: int, counter: int) -> int:
        """A distinct seed for every (run seed, random stream, epoch or step, rank)."""
        accelerator = self.accelerator
        run = ((self.config.train.seed * 2 + stream) << 32) + counter
        return run * accelerator.num_processes + accelerator.process_index

    def loader(self, epoch: int, crops: MultiCropSettings, position: DataPosition | None = None) -> Iterator[dict]:
        """Stacked crop batches of pass ``epoch`` over this rank's share of the stream, after ``position``.

        Each batch carries ``worker`` and ``rows`` (see ``data.position``)."""
        config, accelerator = self.config, self.accelerator
        stream = load_image_stream(config.data, accelerator.process_index, accelerator.num_processes, config.train.seed)
        stream.set_epoch(epoch)
        seed = self.seed(DATA_STREAM, epoch)
        geometry = MultiCropGeometry(crops, seed=seed)
        dataset = MultiCropStream(
            stream, geometry, config.data.image_column, config.data.label_column, seed=seed,
            skip_rows=position.rows if position is not None else (), max_pixels=config.data.max_image_pixels,
        )
        # datasets gives each worker whole shards: more workers than shards would sit idle.
        workers = min(config.train.num_workers, max(getattr(stream, "num_shards", 1), 1))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.train.batch_size_per_device,
            num_workers=workers,
            collate_fn=MultiCropCollator.stack,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating the iterator draws a base seed, which must not come from the global RNG
            # (drop path draws from it, and a resumed pass creates its iterator at another point of the run).
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
        )
        return continue_in_order(loader, workers, position.last_worker if position is not None else None)

    def prepare(self, batch: dict, collator: MultiCropCollator, step: int, micro_batch: int = 0) -> dict:
        """Masks and photometric augmentation on the device, both seeded by (seed, step, micro-batch, rank)."""
        accumulation = self.config.train.gradient_accumulation_steps
        seed = self.seed(STEP_STREAM, step * accumulation + micro_batch)
        batch.update(collator.masks(collator.global_crop_count(batch), random.Random(seed)))
        generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        return augment_batch(batch, self.photometric, self.accelerator.device, generator)
