"""The DINOv2 trainer on Accelerate: data -> SSLMetaArch -> optimizer/EMA, checkpoints, resume, export.

Data path: ``data.sources`` streams images (split by rank) -> ``MultiCropStream`` decodes and crops
in DataLoader workers -> ``MultiCropCollator.stack`` -> on the device: iBOT masks and photometric
augmentation (seeded per step) -> ``SSLMetaArch.forward`` (losses) -> backward, clipping, AdamW step,
EMA teacher.

Reproducibility: worker crops are seeded from (seed, epoch, rank, worker); masks and photometric
augmentation from (seed, step, rank). A resumed run reloads the Accelerate state and replays the stream
to the saved position, so it continues the uninterrupted run's trajectory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from PIL import Image
from tqdm.auto import tqdm

from ..config_utils import to_dict
from ..data.collate import MultiCropCollator
from ..data.decode import ImageDecodeError, open_rgb
from ..data.sources import DataSettings, MultiCropStream, image_source, load_image_stream
from ..data.transforms import BatchedPhotometric, MultiCropGeometry
from ..eval import knn_classify
from ..modeling import Dinov2HFModel
from ..modeling.convert import export_transformers, save_ours
from ..objective import CropsSettings, build_schedules, param_groups
from ..objective.meta_arch import collapse_advice
from ..objective.schedules import Schedules
from ..objective.step import augment_batch, training_step
from . import run_dir
from .build import build_arch
from .checkpoint import atomic_checkpoint, prune_checkpoints
from .config import TrainConfig
from .parallel import fsdp_requested, full_root_params, full_state_dict, load_sharded, save_sharded, shard_meta_arch
from .run_dir import RunDir

logger = logging.getLogger(__name__)
DATA_STREAM, STEP_STREAM = 0, 1  # the per-epoch data seeds and the per-step augmentation seeds


def _trackers(log_with: str) -> list[str] | None:
    """``auto``: TensorBoard when it is installed; ``none``; or a comma-separated list for Accelerate."""
    if log_with == "none":
        return None
    if log_with == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else None
    return [name.strip() for name in log_with.split(",") if name.strip()]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _seed_worker(worker_id: int) -> None:
    """Seed the crop RNG of each DataLoader worker from the loader's base seed (set per epoch)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.rng.seed(info.seed)


@dataclass
class Phase:
    """A stretch of training with its own crop sizes and schedules (main, resolution adaptation)."""

    name: str
    crops: CropsSettings
    schedules: Schedules  # indexed from the phase's first step
    collator: MultiCropCollator
    start: int


class Trainer:
    def __init__(self, config: TrainConfig, callbacks: Sequence[object] = ()) -> None:
        """``callbacks``: objects with an ``on_export(trainer, export_dir, last_record)`` method, called on every
        process after the export (``dinov2_hf.hub.hub_callbacks`` writes model cards and pushes)."""
        self.config = config
        self.callbacks = list(callbacks)
        train = config.train
        # `accelerate launch` with a DDP or FSDP config starts torchrun processes; without an accelerator
        # Accelerate would make each a lone process (its CPU launch flags give one process), so they
        # become gloo ranks here. Its FSDP plugin is accelerator-only: such CPU ranks are sharded below
        # with the same fully_shard calls.
        cpu_ranks = _world_size() > 1 and not _has_accelerator()
        fsdp_on_cpu = fsdp_requested() and cpu_ranks
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            log_with=_trackers(train.log_with),
            project_dir=train.output_dir,
            cpu=cpu_ranks,
            # DDP must not broadcast rank 0's buffers each forward: the centering buffers hold each
            # rank's own pending batch sum until their all-reduce.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        set_seed(train.seed)
        self.output_dir = Path(train.output_dir)
        self.run = RunDir(self.output_dir)
        if train.gradient_accumulation_steps < 1:
            raise ValueError(f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} must be at least 1.")
        arch = build_arch(config)
        if train.activation_checkpointing:
            backbone = arch.student["backbone"]  # transformers >= 5.24 renamed gradient -> activation checkpointing
            (getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable)()
        if train.compile:
            arch.compile_blocks()
        shard_here = fsdp_on_cpu and self.accelerator.num_processes > 1  # else Accelerate's plugin shards in prepare
        self.sharded = shard_here or self.accelerator.distributed_type == DistributedType.FSDP
        if shard_here:
            shard_meta_arch(arch)  # before the optimizer: it must hold the sharded parameters
        optimizer = torch.optim.AdamW(
            param_groups(arch.student, config.optim.layerwise_decay, config.optim.patch_embed_lr_mult),
            betas=(config.optim.adamw_beta1, config.optim.adamw_beta2),
        )
        if shard_here:
            self.model, self.optimizer = arch, self.accelerator.prepare(optimizer)  # no DDP wrapper over shards
        else:
            # Wrapped by DDP or Accelerate's FSDP2; accelerator.unwrap_model gives the SSLMetaArch back.
            self.model, self.optimizer = self.accelerator.prepare(arch, optimizer)
        self.phases = self._build_phases(arch.student["backbone"].config.patch_size)
        self.photometric = BatchedPhotometric.for_crops(config.crops.global_crops_size, config.crops.blur, config.crops.blur_reference_size)
        self.step, self.epoch, self.batches_in_epoch, self.skipped_images = 0, 0, 0, 0
        self.stop_signal: int | None = None
        self.stopped_on_collapse = False  # train.stop_on_collapse ended the run
        self._collapsed_steps = 0  # consecutive collapsed steps after warm-up
        self.initial_knn: float | None = None  # kNN monitor at step 0 and of the exported teacher
        self.final_knn: float | None = None
        self._last_collapse_warning = -(10**9)
        self.train_seconds = 0.0  # wall time of the steps so far, over resumed sessions (for the model card)
        self._session_start = time.perf_counter()

    def _build_phases(self, patch_size: int) -> list[Phase]:
        """The main phase and, if configured, the resolution-adaptation phase after it."""
        config = self.config
        global_batch = config.train.batch_size_per_device * self.accelerator.num_processes * config.train.gradient_accumulation_steps

        def phase(name: str, crops, schedule, start: int, steps: int) -> Phase:
            collator = MultiCropCollator(crops.global_crops_size, patch_size, config.ibot.mask_ratio_min_max, config.ibot.mask_sample_probability)
            return Phase(name, crops, build_schedules(schedule, global_batch, total_iters=steps), collator, start)

        main_steps = config.main_steps  # each phase's schedules fitted to its length in this run (train.max_steps)
        phases = [phase("main", config.crops, config.schedule, 0, main_steps)]
        if config.adaptation.steps and config.total_steps > main_steps:
            crops = dataclasses.replace(
                config.crops, global_crops_size=config.adaptation.global_crops_size, local_crops_size=config.adaptation.local_crops_size
            )
            phases.append(phase("adaptation", crops, config.adaptation.schedule, main_steps, config.total_steps - main_steps))
        return phases

    @property
    def phase(self) -> Phase:
        """The phase the next step belongs to."""
        return [p for p in self.phases if p.start <= self.step][-1]

    def describe(self) -> str:
        """Where the run happens, e.g. ``2 processes (MULTI_CPU, FSDP2) on cpu, mixed precision no``."""
        accelerator = self.accelerator
        count = accelerator.num_processes
        where = "1 process" if count == 1 else (
            f"{count} processes ({accelerator.distributed_type.value}, {'FSDP2' if self.sharded else 'DDP'})"
        )
        return f"{where} on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}"

    # -- data ---------------------------------------------------------------------------------------

    def _seed(self, stream: int, counter: int) -> int:
        """A distinct seed for every (run seed, random stream, epoch or step, rank)."""
        accelerator = self.accelerator
        run = ((self.config.train.seed * 2 + stream) << 32) + counter
        return run * accelerator.num_processes + accelerator.process_index

    def batches(self, epoch: int):
        """Stacked crop batches of one pass over this rank's share of the stream."""
        config, accelerator = self.config, self.accelerator
        stream = load_image_stream(config.data, accelerator.process_index, accelerator.num_processes, config.train.seed)
        stream.set_epoch(epoch)
        seed = self._seed(DATA_STREAM, epoch)
        geometry = MultiCropGeometry(self.phase.crops, seed=seed)
        dataset = MultiCropStream(stream, geometry, config.data.image_column, config.data.label_column)
        generator = torch.Generator().manual_seed(seed)
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

    def prepare_batch(self, batch: dict, micro_batch: int = 0) -> dict:
        """Masks and photometric augmentation on the device, both seeded by (seed, step, micro-batch, rank)."""
        accelerator = self.accelerator
        seed = self._seed(STEP_STREAM, self.step * self.config.train.gradient_accumulation_steps + micro_batch)
        batch.update(self.phase.collator.masks(len(batch["global_crops"]), random.Random(seed)))
        generator = torch.Generator(device=accelerator.device).manual_seed(seed)
        return augment_batch(batch, self.photometric, accelerator.device, generator)

    # -- one step -----------------------------------------------------------------------------------

    def train_step(self, batch: dict | list[dict]) -> dict[str, float]:
        return training_step(
            self.accelerator.unwrap_model(self.model),
            self.optimizer,
            batch,
            self.phase.schedules,
            self.step - self.phase.start,
            self.config.optim.clip_grad,
            model=self.model,
            backward=self.accelerator.backward,
            autocast=self.accelerator.autocast,
        )

    # -- monitoring -----------------------------------------------------------------------------------

    def _monitor_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The monitor's labelled images, memory then queries, as one normalised tensor (read once, kept on the CPU)."""
        if getattr(self, "_monitor_cache", None) is None:
            settings = self.config.monitor
            if settings.test_source:  # memory from `source`, queries from `test_source`
                pixels, labels = self._labelled_pixels(settings.source, settings.train_images)
                test_pixels, test_labels = self._labelled_pixels(settings.test_source, settings.test_images)
                pixels, labels = pixels + test_pixels, labels + test_labels
            else:
                pixels, labels = self._labelled_pixels(settings.source, settings.train_images + settings.test_images)
            if len(pixels) < 2:
                raise ValueError(f"monitor.source={settings.source!r} gave {len(pixels)} labelled images; need at least 2.")
            normalized = self.photometric.normalize(torch.stack(pixels).float().div_(255))
            self._monitor_cache = (normalized, torch.tensor(labels))
        return self._monitor_cache

    def _labelled_pixels(self, source: str, wanted: int) -> tuple[list[torch.Tensor], list[int]]:
        """The first ``wanted`` decodable images of ``source`` resized to the global crop size, with labels."""
        settings = self.config.monitor
        stream = load_image_stream(
            DataSettings(source=source, image_column=settings.image_column, label_column=settings.label_column, shuffle_buffer=0)
        )
        size = self.config.crops.global_crops_size
        pixels, labels = [], []
        for example in stream:
            if len(pixels) == wanted:
                break
            try:
                image = open_rgb(image_source(example[settings.image_column]))
            except ImageDecodeError:
                continue
            resized = image.resize((size, size), Image.Resampling.BICUBIC)
            pixels.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
            labels.append(int(example[settings.label_column]))
        return pixels, labels

    def _monitoring(self) -> bool:
        """Whether this process runs the kNN monitor: sharded models need every rank in the feature
        pass; otherwise the main process alone."""
        return bool(self.config.monitor.source) and (self.sharded or self.accelerator.is_main_process)

    @torch.no_grad()
    def knn_monitor(self) -> float:
        """Weighted kNN top-1 of the exported backbone's (the EMA's) normalised CLS on the monitor split."""
        pixels, labels = self._monitor_images()
        backbone = self.accelerator.unwrap_model(self.model).exported_backbone
        features = []
        with full_root_params(self.model):
            for chunk in pixels.split(256):
                with self.accelerator.autocast():
                    features.append(backbone(chunk.to(self.accelerator.device)).pooler_output.float().cpu())
        features = torch.cat(features)
        n_train = min(self.config.monitor.train_images, len(features) - 1)  # (memory first, then queries)
        return knn_classify(features[:n_train], labels[:n_train], features[n_train:], labels[n_train:], ks=(self.config.monitor.k,))[self.config.monitor.k]

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        root = self.run.checkpoints
        accelerator = self.accelerator
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "skipped_images": self.skipped_images,
                 **self.compute_record()}
        accelerator.unwrap_model(self.model).apply_pending_center_updates()  # rank-local buffers -> shared
        with atomic_checkpoint(root, self.step, accelerator.is_main_process, accelerator.wait_for_everyone) as folder:
            if self.sharded:
                save_sharded(folder / run_dir.SHARDED_DIR, self.model, self.optimizer.optimizer)
                torch.save(torch.get_rng_state(), folder / run_dir.rng_file(accelerator.process_index))
            else:
                accelerator.save_state(str(folder))
            if accelerator.is_main_process:
                run_dir.write_trainer_state(folder, state)
                # The recipe travels with the weights: a checkpoint can serve as a distillation teacher.
                run_dir.write_recipe(folder, self.config)
        if accelerator.is_main_process:
            prune_checkpoints(root, self.config.train.keep_last)
        return self.run.checkpoint(self.step)

    def compute_record(self) -> dict:
        """Processes, device, precision and training wall time so far: the model card's compute section."""
        accelerator = self.accelerator
        return {"num_processes": accelerator.num_processes, "device": accelerator.device.type,
                "mixed_precision": accelerator.mixed_precision,
                "train_seconds": round(self.train_seconds + time.perf_counter() - self._session_start, 1)}

    def maybe_resume(self) -> None:
        resume = self.config.train.resume
        if resume == "none":
            return
        path = self.run.latest() if resume == "auto" else Path(resume)
        if path is None:
            return
        state = run_dir.read_trainer_state(path)  # (fails on an incomplete checkpoint before loading anything)
        if self.sharded:
            load_sharded(path / run_dir.SHARDED_DIR, self.model, self.optimizer.optimizer)
            torch.set_rng_state(torch.load(path / run_dir.rng_file(self.accelerator.process_index), weights_only=True))
        else:
            self.accelerator.load_state(str(path))
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch, self.skipped_images = state["batches_in_epoch"], state["skipped_images"]
        self.train_seconds = state.get("train_seconds", 0.0)  # (the session clock restarts in _train)
        if self.accelerator.is_main_process:  # drop steps the checkpoint does not hold
            self.run.truncate_metrics(self.step)
        logger.info("Resumed from %s at step %d", path, self.step)

    # -- loop -----------------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """A signal or ``train.stop_on_collapse`` asked the run to stop after the current step."""
        return self.stop_signal is not None or self.stopped_on_collapse

    def _handle_signals(self) -> dict:
        """SIGTERM / SIGINT finish the current step, write a checkpoint and stop (resume continues).

        Returns the handlers replaced, which :meth:`train` puts back when it returns.
        """
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            self.stop_signal = signum

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _log(self, record: dict, progress, images_per_second: float) -> None:
        if self.accelerator.is_main_process:  # every step, tracker-independent: output_dir/metrics.jsonl
            self.run.append_metrics({**record, "images_per_second": images_per_second})
        if self.step % self.config.train.log_every == 0 or self.step == self.config.total_steps:
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log({**metrics, "images_per_second": images_per_second}, step=self.step)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{images_per_second:.0f}", skipped=self.skipped_images)
            progress.update(1)

    def _watch_collapse(self, record: dict, phase: Phase) -> None:
        """Warn (at most once per 100 steps) about collapsed steps after the lr warm-up of ``phase``, naming the
        recipe keys to change; stop the run after ``train.stop_on_collapse`` consecutive ones."""
        step = record["step"]
        after_warmup = step - phase.start >= phase.schedules.lr.warmup_iters
        self._collapsed_steps = self._collapsed_steps + 1 if record.get("collapse") and after_warmup else 0
        if not self._collapsed_steps:
            return
        limit = self.config.train.stop_on_collapse
        if step - self._last_collapse_warning >= 100 or self._collapsed_steps == limit:
            self._last_collapse_warning = step
            logger.warning("Step %d: %s", step, collapse_advice(record))
        if limit and self._collapsed_steps >= limit:
            self.stopped_on_collapse = True

    def train(self) -> list[dict]:
        """Train to ``total_steps`` (or until SIGTERM/SIGINT); returns the step records.

        Exports the teacher at the end; an interrupted run saves a checkpoint and sets ``stop_signal``.
        The previous signal handlers are restored on return (in a notebook, interrupting the kernel
        raises KeyboardInterrupt again in later cells).
        """
        previous = self._handle_signals()
        try:
            return self._train()
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: installed outside Python, cannot be put back
                    signal.signal(signum, handler)

    def _train(self) -> list[dict]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        set_seed(self.config.train.seed)  # drop path draws from the global RNG: same start whatever ran since __init__
        self.maybe_resume()  # (a resumed run restores the saved RNG states instead)
        self._session_start = time.perf_counter()
        total, history = self.config.total_steps, []
        self.accelerator.init_trackers("dinov2_hf", config={k: str(v) for k, v in to_dict(self.config).items()})
        accumulation = self.config.train.gradient_accumulation_steps
        images_per_step = self.config.train.batch_size_per_device * self.accelerator.num_processes * accumulation
        if self.step == 0 and self.config.monitor.every and self._monitoring():
            self.initial_knn = self.knn_monitor()  # the baseline: the network at initialisation
        progress = tqdm(total=total, initial=self.step, desc="dinov2", unit="step", disable=not self.accelerator.is_main_process)
        end = min(total, self.config.train.stop_at_step or total)
        while self.step < end and not self.stopping:
            produced, phase, micro_batches = 0, self.phase, []
            for index, batch in enumerate(self.batches(self.epoch)):
                if index < self.batches_in_epoch:
                    continue  # replaying the stream up to the resumed position
                micro_batches.append(batch)
                if len(micro_batches) < accumulation:
                    continue  # a pass that ends mid-step drops its last micro-batches (like drop_last)
                started = time.perf_counter()
                self.skipped_images += sum(int(b.pop("skipped", torch.zeros(1)).sum()) for b in micro_batches)
                prepared = [self.prepare_batch(b, i) for i, b in enumerate(micro_batches)]
                micro_batches = []
                record = {
                    "step": self.step,
                    **self.train_step(prepared if accumulation > 1 else prepared[0]),
                    "skipped_images": self.skipped_images,
                    "global_crops_size": phase.crops.global_crops_size,
                }
                if not math.isfinite(record["loss"]):
                    # The optimizer has already applied this step: saving now would keep broken weights.
                    last = self.run.latest()
                    raise RuntimeError(
                        f"The loss is {record['loss']} at step {self.step}; resume from the last good checkpoint ({last}) "
                        "with a lower learning rate or bf16 instead of fp16."
                    )
                every = self.config.monitor.every
                if every and (self.step + 1) % every == 0 and self._monitoring():
                    record["knn_top1"] = self.knn_monitor()
                history.append(record)
                self.step += 1
                self.batches_in_epoch = index + 1
                new_phase = self.phase is not phase
                if new_phase:  # a new phase starts a new pass with its own crop sizes (saved as such)
                    self.epoch, self.batches_in_epoch = self.epoch + 1, 0
                produced += 1
                self._log(record, progress, images_per_step / max(time.perf_counter() - started, 1e-9))
                self._watch_collapse(record, phase)
                if self.step % self.config.train.save_every == 0 or self.stopping or self.step == end:
                    self.save_checkpoint()
                if self.step >= end or self.stopping or new_phase:
                    break
            else:  # the pass ended
                if produced == 0 and self.batches_in_epoch == 0:
                    raise RuntimeError(
                        f"data.source={self.config.data.source!r} produced no batch of {self.config.train.batch_size_per_device} images."
                    )
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        progress.close()
        if self.stop_signal is not None:
            path = self.run.latest()
            logger.warning("Stopped by signal %d at step %d; checkpoint %s. Run the same command to resume.", self.stop_signal, self.step, path)
        elif self.stopped_on_collapse:
            logger.error("Stopped at step %d after %d consecutive collapsed steps (train.stop_on_collapse); checkpoint %s.",
                         self.step, self._collapsed_steps, self.run.latest())
        elif self.step < total:
            logger.info("Stopped at train.stop_at_step=%d of %d steps; rerun without it to resume.", self.step, total)
        else:
            if self.config.monitor.every and self._monitoring():
                self.final_knn = self.knn_monitor()  # of the teacher, i.e. the exported backbone
            export_dir = self.export()
            for callback in self.callbacks:
                callback.on_export(self, export_dir, history[-1] if history else None)
        self.accelerator.end_training()
        return history

    def export(self) -> Path:
        """The exported backbone (teacher, or a distilled student's EMA) in our format and in stock transformers
        format, each with the image processor sized for the resolution the run ended at."""
        arch = self.accelerator.unwrap_model(self.model)
        backbone = arch.exported_backbone
        if self.sharded:  # gather the full exported backbone (collective), then save it from rank 0
            weights = full_state_dict(self.model, prefix=f"{arch.ema_part}.backbone.")
            if self.accelerator.is_main_process:
                backbone = Dinov2HFModel(backbone.config)
                backbone.load_state_dict(weights)
        if self.accelerator.is_main_process:
            crop = run_dir.final_crop_size(self.config, self.step)
            save_ours(backbone, self.run.export_folder(run_dir.OURS_FORMAT), crop_size=crop)
            export_transformers(backbone, self.run.export_folder(run_dir.STOCK_FORMAT), crop_size=crop)
        self.accelerator.wait_for_everyone()
        return self.run.export
