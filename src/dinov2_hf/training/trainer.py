"""The DINOv2 trainer: it orchestrates; the components under ``training/`` do the work.

    build (objective, teacher) -> parallelize (activation checkpointing, compile, FSDP2, Accelerate)
    per step: batches (DataLoader, seeds, device augmentation) -> objective.step -> metrics, monitor
    checkpoint (atomic save, resume, prune) -> export -> callbacks (model cards, Hub push)

A resumed run reloads the checkpoint and the data position (each DataLoader worker skips the rows it had
consumed, without decoding them), so it continues the uninterrupted run's trajectory. ``train()`` returns a :class:`TrainResult`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from ..data.position import DataPosition
from ..data.shutdown import arrow_threads_finish
from ..objective.step import training_step
from .batches import Batches
from .build import build_arch, build_optimizer, check_teacher_source
from .checkpoint import Checkpointer
from .config import TrainConfig
from .export import export_backbone
from .init_from import resolve_init
from .metrics import CollapseWatch, MetricsLogger, trackers
from .monitor import KnnMonitor
from .parallelize import distributed_on_cpu, full_root_params, no_gradient_sync, parallelize
from .phases import Phase, build_phases, phase_at
from .run_dir import RunDir, final_crop_size

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.train` did: the step records of this session, the step reached, why it
    stopped early (a signal, ``train.stop_on_collapse``, ``train.stop_at_step``), the export (None when it
    stopped early), the kNN monitor before and after, when it ran, and the checkpoint it resumed from. A run that
    had already finished (trained and exported) does nothing: ``already_complete``."""

    history: list[dict] = field(default_factory=list)
    steps: int = 0
    total_steps: int = 0
    output_dir: Path | None = None
    export_dir: Path | None = None
    stop_signal: int | None = None
    stopped_on_collapse: bool = False
    initial_knn: float | None = None
    final_knn: float | None = None
    resumed_from: Path | None = None
    already_complete: bool = False  # the run had finished and exported before: nothing was done

    @property
    def last(self) -> dict | None:
        return self.history[-1] if self.history else None


class Trainer:
    def __init__(self, config: TrainConfig, callbacks: Sequence[object] = ()) -> None:
        """``callbacks``: objects with an ``on_export(trainer, export_dir, last_record)`` method, called on every
        process after the export (``dinov2_hf.hub.hub_callbacks`` writes model cards and pushes)."""
        # model.init_from: the source checked against the recipe before any work, its architecture written into
        # the recipe the checkpoints carry (the config is returned unchanged without it).
        config, self.init_source = resolve_init(config)
        train = config.train  # its values were checked when the config was built (TrainConfig.__post_init__)
        self.config, self.callbacks = config, list(callbacks)
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            log_with=trackers(train.log_with),
            project_dir=train.output_dir,
            cpu=distributed_on_cpu(),
            # DDP must not broadcast rank 0's buffers each forward: the centering buffers hold each
            # rank's own pending batch sum until their all-reduce.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        set_seed(train.seed)
        self.run = RunDir(train.output_dir)
        self.output_dir = self.run.root
        check_teacher_source(config)
        self.batches = Batches(config, self.accelerator)  # (checks the data source before the model is built)
        self.monitor = KnnMonitor(config.monitor, config.crops.global_crops_size) if config.monitor.source else None
        arch = build_arch(config, self.init_source)
        self.freeze_steps = max(train.freeze_backbone_steps, 0)  # (-1, auto, is resolved with model.init_from)
        self.model, self.optimizer, self.sharded = parallelize(
            arch, self.accelerator, train, lambda module: build_optimizer(module, config.optim)
        )
        self.phases = build_phases(config, arch.student["backbone"].config.patch_size, self.accelerator.num_processes)
        self.checkpointer = Checkpointer(self.accelerator, self.run, self.sharded, train.keep_last)
        self.metrics = MetricsLogger(self.accelerator, self.run, config)
        self.collapse_watch = CollapseWatch(train.stop_on_collapse)
        self.step, self.epoch, self.skipped_images = 0, 0, 0
        self.position = DataPosition()  # of this rank, in pass ``epoch``
        self._replay = 0  # batches to iterate past: resuming from a checkpoint that predates data positions
        self.stop_signal: int | None = None
        self.stopped_on_collapse = False  # train.stop_on_collapse ended the run
        self.resumed_from: Path | None = None  # the checkpoint this session continued
        self.train_seconds = 0.0  # wall time of the steps so far, over resumed sessions (for the model card)
        self._session_start = time.perf_counter()

    @property
    def batches_in_epoch(self) -> int:
        """Loader batches consumed in the current pass."""
        return self.position.batches

    @property
    def phase(self) -> Phase:
        """The phase the next step belongs to."""
        return phase_at(self.phases, self.step)

    def describe(self) -> str:
        """Where the run happens, e.g. ``2 processes (MULTI_CPU, FSDP2) on cpu, mixed precision no``."""
        accelerator = self.accelerator
        count = accelerator.num_processes
        where = "1 process" if count == 1 else (
            f"{count} processes ({accelerator.distributed_type.value}, {'FSDP2' if self.sharded else 'DDP'})"
        )
        return f"{where} on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}"

    def train_step(self, batch: dict | list[dict]) -> dict[str, float]:
        """One optimizer step on a batch (or a list of micro-batches): losses, metrics and schedule values."""
        return training_step(
            self.accelerator.unwrap_model(self.model), self.optimizer, batch, self.phase.schedules,
            self.step - self.phase.start, self.config.optim.clip_grad,
            model=self.model, backward=self.accelerator.backward, autocast=self.accelerator.autocast,
            no_sync=lambda: no_gradient_sync(self.model), frozen=("backbone",) if self.step < self.freeze_steps else (),
        )

    def knn_monitor(self) -> float:
        """The kNN monitor on the exported backbone (every rank of a sharded model takes part)."""
        backbone = self.accelerator.unwrap_model(self.model).exported_backbone
        with full_root_params(self.model):
            return self.monitor(backbone, self.accelerator.device, self.accelerator.autocast)

    def _monitoring(self) -> bool:
        """Whether this process runs the monitor: sharded models need every rank, otherwise the main one alone."""
        return self.monitor is not None and (self.sharded or self.accelerator.is_main_process)

    def compute_record(self) -> dict:
        """Processes, device, precision and training wall time so far: the model card's compute section."""
        accelerator = self.accelerator
        return {"num_processes": accelerator.num_processes, "device": accelerator.device.type,
                "mixed_precision": accelerator.mixed_precision,
                "train_seconds": round(self.train_seconds + time.perf_counter() - self._session_start, 1)}

    def save_checkpoint(self) -> Path:
        self.accelerator.unwrap_model(self.model).apply_pending_center_updates()  # rank-local buffers -> shared
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "skipped_images": self.skipped_images, **self.compute_record()}
        return self.checkpointer.save(self.model, self.optimizer, self.step, state, self.config, self.position.to_dict())

    def maybe_resume(self) -> None:
        state = self.checkpointer.resume(self.config.train.resume, self.model, self.optimizer, self.config)
        if state is not None:
            self.resumed_from = state["path"]
            self.step, self.epoch, self.skipped_images = state["step"], state["epoch"], state["skipped_images"]
            if state["data_position"] is not None:
                self.position = DataPosition.from_dict(state["data_position"])
            else:
                self._replay = state["batches_in_epoch"]
            self.train_seconds = state.get("train_seconds", 0.0)  # (the session clock restarts in _train)

    @property
    def stopping(self) -> bool:
        """A signal or ``train.stop_on_collapse`` asked the run to stop after the current step."""
        return self.stop_signal is not None or self.stopped_on_collapse

    def _handle_signals(self) -> dict:
        """SIGTERM / SIGINT finish the current step, write a checkpoint and stop (resume continues).
        Returns the handlers replaced, which :meth:`train` puts back when it returns."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if self.stop_signal is None:  # the first one: Ctrl-C under a launcher is followed by its SIGTERM
                self.stop_signal = signum

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    def train(self) -> TrainResult:
        """Train to ``total_steps``, export, run the callbacks; or stop early (SIGTERM/SIGINT,
        ``train.stop_on_collapse``, ``train.stop_at_step``) after a checkpoint, reported in the result. The previous signal
        handlers are restored on return (in a notebook, interrupting the kernel raises KeyboardInterrupt
        again in later cells).

        Streams dropped mid-pass are collected on return, and the process waits for their Arrow threads once,
        at exit (``data.shutdown.arrow_threads_finish``), without which it can abort there.
        """
        previous = self._handle_signals()
        try:
            with arrow_threads_finish():
                return self._train()
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: installed outside Python, cannot be put back
                    signal.signal(signum, handler)

    def _train(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        self.run.root.mkdir(parents=True, exist_ok=True)
        set_seed(config.train.seed)  # drop path draws from the global RNG: same start whatever ran since __init__
        self.maybe_resume()  # (a resumed run restores the saved RNG states instead)
        self._session_start = time.perf_counter()
        total = config.total_steps
        result = TrainResult(output_dir=self.run.root, resumed_from=self.resumed_from, steps=self.step, total_steps=total)
        if self.step >= total and self.run.exported_step() == self.step:
            result.export_dir, result.already_complete = self.run.export, True
            return result
        every = config.monitor.every if self._monitoring() else 0
        if self.step == 0 and every:
            result.initial_knn = self.knn_monitor()  # the baseline: the network at initialisation
        self.metrics.start(self.step, self.resumed_from)
        end = min(total, config.train.stop_at_step or total)
        while self.step < end and not self.stopping:
            self._train_pass(result.history, every, end)
        if self.stopping and self.step > 0 and self.run.latest() != self.run.checkpoint(self.step):
            self.save_checkpoint()  # the signal came between two passes, after the last step's save check
        self.metrics.close()
        result.steps, result.total_steps = self.step, total
        result.stop_signal, result.stopped_on_collapse = self.stop_signal, self.stopped_on_collapse
        if self.stop_signal is not None:
            logger.info("Stopped by signal %d at step %d; checkpoint %s. Run the same command to resume.",
                        self.stop_signal, self.step, self.run.latest())
        elif self.stopped_on_collapse:
            logger.error("Stopped at step %d after %d consecutive collapsed steps (train.stop_on_collapse); checkpoint %s.",
                         self.step, self.collapse_watch.collapsed_steps, self.run.latest())
        elif self.step < total:
            logger.info("Stopped at train.stop_at_step=%d of %d steps; rerun without it to resume.", self.step, total)
        else:
            if every:
                result.final_knn = self.knn_monitor()  # of the exported backbone
            crop = final_crop_size(config, self.step)
            result.export_dir = export_backbone(self.model, accelerator, self.sharded, self.run, crop, self.step)
            for callback in self.callbacks:
                callback.on_export(self, result.export_dir, result.last)
        accelerator.end_training()
        return result

    def _train_pass(self, history: list[dict], monitor_every: int, end: int) -> None:
        """Steps over (the rest of) one pass of the data, up to a phase change, step ``end`` or a stop."""
        config, accumulation = self.config, self.config.train.gradient_accumulation_steps
        images_per_step = config.train.batch_size_per_device * self.accelerator.num_processes * accumulation
        produced, phase, micro_batches = 0, self.phase, []
        replay, self._replay = self._replay, 0
        resumed = self.position if self.position.batches else None
        for batch in self.batches.loader(self.epoch, phase.crops, resumed):
            self.position.advance(int(batch.pop("worker")[0]), int(batch.pop("rows")[-1]))
            if self.position.batches <= replay:
                continue  # replaying the pass up to the position of a checkpoint that did not save it
            micro_batches.append(batch)
            if len(micro_batches) < accumulation:
                continue  # a pass that ends mid-step drops its last micro-batches (like drop_last)
            started = time.perf_counter()
            self.skipped_images += sum(int(b.pop("skipped", torch.zeros(1)).sum()) for b in micro_batches)
            prepared = [self.batches.prepare(b, phase.collator, self.step, i) for i, b in enumerate(micro_batches)]
            micro_batches = []
            record = {"step": self.step, **self.train_step(prepared if accumulation > 1 else prepared[0]),
                      "skipped_images": self.skipped_images, "global_crops_size": phase.crops.global_crops_size}
            if not math.isfinite(record["loss"]):
                # The optimizer has already applied this step: saving now would keep broken weights.
                raise RuntimeError(
                    f"The loss is {record['loss']} at step {self.step}; resume from the last good checkpoint "
                    f"({self.run.latest()}) with a lower learning rate or bf16 instead of fp16."
                )
            if monitor_every and (self.step + 1) % monitor_every == 0:
                record["knn_top1"] = self.knn_monitor()
            history.append(record)
            self.step += 1
            new_phase = self.phase is not phase
            if new_phase:  # a new phase starts a new pass with its own crop sizes (saved as such)
                self.epoch, self.position = self.epoch + 1, DataPosition()
            produced += 1
            self.metrics.log(record, self.step, images_per_step / max(time.perf_counter() - started, 1e-9), self.skipped_images)
            self.stopped_on_collapse = self.stopped_on_collapse or self.collapse_watch(record, phase)
            if self.step % config.train.save_every == 0 or self.stopping or self.step == end:
                self.save_checkpoint()
            if self.step >= end or self.stopping or new_phase:
                return
        if produced == 0 and self.position.batches == 0:
            raise RuntimeError(
                f"data.source={config.data.source!r} produced no batch of {config.train.batch_size_per_device} images."
            )
        self.epoch, self.position = self.epoch + 1, DataPosition()  # the pass ended
