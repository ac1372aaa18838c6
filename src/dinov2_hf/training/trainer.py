"""The DINOv2 trainer on Accelerate: data -> SSLMetaArch -> optimizer/EMA, checkpoints, resume, export.

Data path: ``data.sources`` streams images (split by rank) -> ``MultiCropStream`` decodes and crops
in DataLoader workers -> ``MultiCropCollator.stack`` -> on the device: iBOT masks and photometric
augmentation (seeded per step) -> ``SSLMetaArch.forward`` (losses) -> backward, clipping, AdamW step,
EMA teacher.

Reproducibility: worker crops are seeded from (seed, epoch, rank, worker); masks and photometric
augmentation from (seed, step). A resumed run reloads the Accelerate state and replays the stream
to the saved position, so it continues the uninterrupted run's trajectory.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data.collate import MultiCropCollator
from ..data.sources import MultiCropStream, load_image_stream
from ..data.transforms import BatchedPhotometric, MultiCropGeometry
from ..modeling.convert import export_transformers, save_ours
from ..ssl import SSLMetaArch, build_schedules, build_student_config, param_groups
from ..ssl.param_groups import apply_schedules
from .checkpoint import atomic_checkpoint, latest_checkpoint, prune_checkpoints
from .config import TrainConfig

logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"


def _seed_worker(worker_id: int) -> None:
    """Seed the crop RNG of each DataLoader worker from the loader's base seed (set per epoch)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.rng.seed(info.seed)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        train = config.train
        self.accelerator = Accelerator(mixed_precision=train.mixed_precision)
        set_seed(train.seed)
        self.output_dir = Path(train.output_dir)
        self.arch = SSLMetaArch(config)
        self.patch_size = build_student_config(config).patch_size
        optimizer = torch.optim.AdamW(
            param_groups(self.arch.student, config.optim.layerwise_decay, config.optim.patch_embed_lr_mult),
            betas=(config.optim.adamw_beta1, config.optim.adamw_beta2),
        )
        self.model, self.optimizer = self.accelerator.prepare(self.arch, optimizer)
        world = self.accelerator.num_processes
        self.schedules = build_schedules(config.schedule, train.batch_size_per_device * world)
        self.collator = MultiCropCollator(
            config.crops.global_crops_size, self.patch_size, config.ibot.mask_ratio_min_max, config.ibot.mask_sample_probability
        )
        self.photometric = BatchedPhotometric(blur=config.crops.blur)
        self.step, self.epoch, self.batches_in_epoch, self.skipped_images = 0, 0, 0, 0

    # -- data ---------------------------------------------------------------------------------------

    def batches(self, epoch: int):
        """Stacked crop batches of one pass over this rank's share of the stream."""
        config, accelerator = self.config, self.accelerator
        stream = load_image_stream(config.data, accelerator.process_index, accelerator.num_processes, config.train.seed)
        stream.set_epoch(epoch)
        geometry = MultiCropGeometry(config.crops, seed=hash((config.train.seed, epoch, accelerator.process_index)))
        dataset = MultiCropStream(stream, geometry, config.data.image_column, config.data.label_column)
        generator = torch.Generator().manual_seed(config.train.seed * 1000 + epoch * 10 + accelerator.process_index)
        # datasets gives each worker whole shards: more workers than shards would sit idle.
        workers = min(config.train.num_workers, max(getattr(stream, "num_shards", 1), 1))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=config.train.batch_size_per_device,
            num_workers=workers,
            collate_fn=MultiCropCollator.stack,
            worker_init_fn=_seed_worker if workers else None,
            generator=generator,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
        )

    def prepare_batch(self, batch: dict) -> dict:
        """Masks and photometric augmentation on the device, both seeded by (seed, step)."""
        seed = self.config.train.seed * 1_000_003 + self.step
        batch.update(self.collator.masks(len(batch["global_crops"]), random.Random(seed)))
        device = self.accelerator.device
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        generator = torch.Generator(device=device).manual_seed(seed)
        batch["global_crops"] = self.photometric.global_crops(batch["global_crops"], generator)
        batch["local_crops"] = self.photometric.local_crops(batch["local_crops"], generator)
        return batch

    # -- one step -----------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, float]:
        arch = self.accelerator.unwrap_model(self.model)
        values = self.schedules.at(self.step)
        apply_schedules(self.optimizer, values["lr"], values["weight_decay"], values["last_layer_lr"])
        with self.accelerator.autocast():
            out = self.model(batch, teacher_temp=values["teacher_temp"])
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(out["loss"])
        grad_norms = arch.clip_gradients(self.config.optim.clip_grad)
        self.optimizer.step()
        arch.update_teacher(values["momentum"])
        return {**{k: v.item() for k, v in {**out, **grad_norms}.items()}, **values}

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        root = self.output_dir / "checkpoints"
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "skipped_images": self.skipped_images}
        with atomic_checkpoint(root, self.step) as folder:
            self.accelerator.save_state(str(folder))
            (folder / TRAINER_STATE).write_text(json.dumps(state))
        prune_checkpoints(root, self.config.train.keep_last)
        return root / f"checkpoint-{self.step}"

    def maybe_resume(self) -> None:
        resume = self.config.train.resume
        if resume == "none":
            return
        path = latest_checkpoint(self.output_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            return
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}).")
        self.accelerator.load_state(str(path))
        state = json.loads((path / TRAINER_STATE).read_text())
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch, self.skipped_images = state["batches_in_epoch"], state["skipped_images"]
        logger.info("Resumed from %s at step %d", path, self.step)

    # -- loop -----------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """Train to ``total_steps``; returns the logged records. Exports the teacher at the end."""
        self.maybe_resume()
        total, history = self.config.total_steps, []
        while self.step < total:
            produced = 0
            for index, batch in enumerate(self.batches(self.epoch)):
                if index < self.batches_in_epoch:
                    continue  # replaying the stream up to the resumed position
                self.skipped_images += int(batch.pop("skipped", torch.zeros(1)).sum())
                record = {"step": self.step, **self.train_step(self.prepare_batch(batch)), "skipped_images": self.skipped_images}
                history.append(record)
                self.step += 1
                self.batches_in_epoch = index + 1
                produced += 1
                if self.step % self.config.train.save_every == 0:
                    self.save_checkpoint()
                if self.step >= total:
                    break
            if self.step < total:
                if produced == 0 and self.batches_in_epoch == 0:
                    raise RuntimeError(
                        f"data.source={self.config.data.source!r} produced no batch of {self.config.train.batch_size_per_device} images."
                    )
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        self.save_checkpoint()
        self.export()
        return history

    def export(self) -> Path:
        """The teacher backbone in our format (heads stay in the checkpoints) and in stock transformers format."""
        backbone = self.accelerator.unwrap_model(self.model).teacher["backbone"]
        export_dir = self.output_dir / "export"
        if self.accelerator.is_main_process:
            crop = self.config.crops.global_crops_size
            save_ours(backbone, export_dir / "dinov2_hf", crop_size=crop)
            export_transformers(backbone, export_dir / "transformers", crop_size=crop)
        self.accelerator.wait_for_everyone()
        return export_dir
