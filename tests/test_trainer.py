"""The trainer on CPU: loss goes down, kill-and-resume continues the same trajectory, bad images are
counted, the export loads with stock transformers."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dinov2_hf.config_utils import ConfigError
from dinov2_hf.hub import hub_callbacks
from dinov2_hf.training.config import load_train_config
from dinov2_hf.training.trainer import Trainer


def write_cifar_subset(cifar_dir, folder, rows=192, corrupt=0):
    table = pq.read_table(cifar_dir / "test-00000-of-00001.parquet").slice(0, rows)
    images = table.column("image").to_pylist()
    for i in range(corrupt):
        images[5 + 7 * i] = {"bytes": b"\x89PNG broken" if i % 2 else b"", "path": None}
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": table.column("label")}), folder / "train-00000-of-00001.parquet")
    return folder


def tiny_overrides(data_dir, output_dir, extra: tuple[str, ...] = (), **train) -> list[str]:
    return [
        f"data.source={data_dir}", "data.shuffle_buffer=32",
        "model.overrides.hidden_size=48", "model.overrides.num_hidden_layers=2", "model.overrides.num_attention_heads=2",
        "dino.head_n_prototypes=128", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_n_prototypes=128",
        "crops.local_crops_number=2", "schedule.epochs=4", "schedule.epoch_length=2", "schedule.warmup_epochs=1",
        "schedule.warmup_teacher_temp_epochs=1", "schedule.momentum_teacher=0.9",
        "train.batch_size_per_device=16", "train.num_workers=0", "train.mixed_precision=no",
        f"train.output_dir={output_dir}", "train.save_every=3",
    ] + [f"train.{k}={v}" for k, v in train.items()] + list(extra)


def tiny_config(data_dir, output_dir, extra: tuple[str, ...] = (), **train):
    return load_train_config("cifar10", tiny_overrides(data_dir, output_dir, extra, **train))


KILLED_RUN = """
import json, os, signal, sys
import torch
from dinov2_hf.training import run_dir
from dinov2_hf.training.config import load_train_config
from dinov2_hf.training.trainer import Trainer

overrides, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))  # the test process's: the same float summation order
write_trainer_state = run_dir.write_trainer_state

def write_then_die(folder, state):
    if state["step"] == kill_at:  # mid-checkpoint: weights and optimizer written, not yet marked complete
        os.kill(os.getpid(), signal.SIGKILL)
    write_trainer_state(folder, state)

run_dir.write_trainer_state = write_then_die
Trainer(load_train_config("cifar10", overrides)).train()
"""


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_trajectory(cifar_dir, tmp_path):
    """SIGKILL while checkpoint 6 is being written: no handler runs, a half-written temporary folder is left.
    The rerun resumes from checkpoint 3, ignores (and removes) the leftover, and continues the uninterrupted
    run's trajectory exactly."""
    import signal
    import subprocess
    import sys

    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    full = Trainer(tiny_config(data, tmp_path / "full")).train().history
    assert len(full) == 8
    run = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(tiny_overrides(data, run)), "6",
                             str(torch.get_num_threads())],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
    assert any(p.name.startswith(".") for p in checkpoints.iterdir())  # the half-written checkpoint 6
    logged = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([r["loss"] for r in full[:6]], rel=1e-6)  # steps 0-5 ran before the kill
    resumed = Trainer(tiny_config(data, run)).train().history  # resume=auto
    assert [r["step"] for r in resumed] == list(range(3, 8))
    for a, b in zip(resumed, full[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a["step"], a["loss"], b["loss"])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))  # the killed session's steps 3-5 were dropped, not logged twice


def test_a_run_killed_before_its_first_checkpoint_restarts_without_duplicate_metrics(cifar_dir, tmp_path):
    """The killed session logged steps 0-4 and wrote no checkpoint (and tore its last line): the rerun starts from
    step 0 and the file holds one row per step."""
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=96)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(5)) + '{"st')
    history = Trainer(tiny_config(data, run, max_steps=3)).train().history
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert [r["loss"] for r in logged] == [r["loss"] for r in history]


def test_bad_images_are_counted_and_export_loads_in_stock_transformers(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data", corrupt=4)
    config = tiny_config(data, tmp_path / "run", max_steps=8, num_workers=1)
    history = Trainer(config, hub_callbacks(config)).train().history  # with the model cards
    assert history[-1]["skipped_images"] == 4
    from transformers import AutoImageProcessor, AutoModel

    export = tmp_path / "run" / "export" / "transformers"
    model = AutoModel.from_pretrained(export)
    processor = AutoImageProcessor.from_pretrained(export)
    assert type(model).__name__ == "Dinov2Model" and processor.crop_size.height == 32
    from PIL import Image

    # the cards' usage code opens image.jpg: write it, and compute the reference from what it reads back
    Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype("uint8")).save(tmp_path / "image.jpg")
    image = Image.open(tmp_path / "image.jpg").convert("RGB")
    features = model(**processor(image, return_tensors="pt")).pooler_output
    assert features.shape == (1, 48)
    assert (tmp_path / "run" / "export" / "dinov2_hf" / "modeling_dinov2_hf.py").is_file()
    check_model_cards(tmp_path / "run", image, expected_features=features)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert json.loads((checkpoints[-1] / "trainer_state.json").read_text())["step"] == 8


def check_model_cards(run, image, expected_features):
    """Each export carries a card that parses, records recipe/data/steps/compute, and whose usage code runs as
    written (in the folder that holds image.jpg)."""
    import os
    import re

    import yaml
    from huggingface_hub import ModelCard

    for export_format in ("transformers", "dinov2_hf"):
        folder = run / "export" / export_format
        card = ModelCard.load(folder / "README.md")
        assert card.data.pipeline_tag == "image-feature-extraction" and card.data.library_name == "transformers"
        assert "after 8 steps" in card.text and "| skipped_images | 4 |" in card.text
        recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card.text, flags=re.S).group(1))
        assert recipe["train"]["max_steps"] == 8 and recipe["data"]["source"].endswith("data")
        assert "| processes | 1 (cpu) |" in card.text and "| optimizer steps | 8 |" in card.text
        namespace, cwd = {}, os.getcwd()
        os.chdir(run.parent)  # where image.jpg is
        try:
            exec(re.search(r"```python\n(.*?)```", card.text, flags=re.S).group(1), namespace)
        finally:
            os.chdir(cwd)
        torch.testing.assert_close(namespace["features"], expected_features, rtol=1e-4, atol=1e-5)


def test_bad_config_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key.*lerning_rate"):
        load_train_config("cifar10", ["schedule.lerning_rate=0.1"])
    with pytest.raises(ConfigError, match="train.batch_size_per_device: expected an integer"):
        load_train_config("cifar10", ["train.batch_size_per_device=big"])
    with pytest.raises(FileNotFoundError, match="neither a YAML file nor a recipe"):
        load_train_config("no-such-recipe")
    with pytest.raises(ConfigError, match="model.layerscale_value: expected a number"):
        load_train_config("cifar10", ["model.layerscale_value=tiny"])
    with pytest.raises(ConfigError, match="model: Unknown preset 'vitx14'"):
        load_train_config("cifar10", ["model.preset=vitx14"])
    with pytest.raises(ConfigError, match="schedule.lr_scaling.*sqrt_wrt_1024"):
        load_train_config("cifar10", ["schedule.lr_scaling=linear"])
    with pytest.raises(ConfigError, match="crops.blur"):
        load_train_config("cifar10", ["crops.blur=gaussian"])
    # YAML 1.1 reads 1e-5 as a string; float fields accept it as users write it.
    assert load_train_config("cifar10", ["model.layerscale_value=1e-5"]).model.layerscale_value == 1e-5


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(cifar_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    args = ["--config", "cifar10", f"data.source={data}", "data.shuffle_buffer=16", "model.overrides.hidden_size=48",
            "model.overrides.num_hidden_layers=2", "model.overrides.num_attention_heads=2", "dino.head_n_prototypes=128",
            "ibot.head_n_prototypes=128", "train.batch_size_per_device=8", "train.num_workers=0",
            "train.mixed_precision=no", "train.save_every=100000", f"train.output_dir={tmp_path / 'run'}"]
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, str(root / "train.py"), *args, "train.max_steps=100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Signal once the first step is logged: the handlers are installed by then (a fixed sleep raced them).
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "run the same command to resume" in stdout
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    rerun = subprocess.run([sys.executable, str(root / "train.py"), *args, f"train.max_steps={stopped_at + 2}"],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"step {stopped_at + 2}: loss" in rerun.stdout


def test_knn_monitor_logs_accuracy(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=96)
    config = tiny_config(data, tmp_path / "run", max_steps=4)
    config.monitor.every, config.monitor.source = 2, str(data)
    config.monitor.train_images, config.monitor.test_images = 64, 32
    result = Trainer(config).train()
    accuracies = [r["knn_top1"] for r in result.history if "knn_top1" in r]
    assert len(accuracies) == 2 and result.final_knn == accuracies[-1]
    # The last one is of the exported weights: recompute it independently, with stock transformers on the export
    # and pixels normalised by hand (32 px images at a 32 px crop: no resize).
    import io

    from PIL import Image
    from transformers import AutoModel

    from dinov2_hf.eval import knn_classify
    from dinov2_hf.modeling.processor import IMAGENET_MEAN, IMAGENET_STD

    table = pq.read_table(data / "train-00000-of-00001.parquet")
    images = [np.asarray(Image.open(io.BytesIO(row["bytes"])).convert("RGB"), dtype=np.float32) / 255
              for row in table.column("image").to_pylist()]
    pixels = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD)[:, None, None]
    labels = torch.tensor(table.column("label").to_pylist())
    model = AutoModel.from_pretrained(result.export_dir / "transformers").eval()
    with torch.no_grad():
        features = model(pixel_values=pixels).pooler_output
    expected = knn_classify(features[:64], labels[:64], features[64:], labels[64:], ks=(20,))[20]
    assert accuracies[-1] == pytest.approx(expected, abs=1.5 / 32)  # one of the 32 queries may flip on a float tie


def test_resolution_adaptation_phase_and_resume_across_it(cifar_dir, tmp_path):
    """Main phase at 32 px, then the adaptation phase at 48 px with its own schedules; a run stopped
    at the boundary resumes onto the uninterrupted trajectory; the export is sized for 48 px."""
    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    adaptation = ["adaptation.global_crops_size=48", "adaptation.local_crops_size=24", "adaptation.schedule.epochs=1",
                  "adaptation.schedule.epoch_length=3", "adaptation.schedule.base_lr=0.001"]

    full = Trainer(tiny_config(data, tmp_path / "full", adaptation)).train().history
    assert [r["global_crops_size"] for r in full] == [32] * 8 + [48] * 3
    assert full[8]["lr"] == 0.0 and full[9]["lr"] > 0.0  # the adaptation schedule warms up from 0 again
    assert full[8]["teacher_temp"] == 0.07 and full[8]["last_layer_lr"] == full[8]["lr"]  # no temp warmup, no freeze
    stopped = Trainer(tiny_config(data, tmp_path / "resumed", adaptation, stop_at_step=8)).train().history
    assert len(stopped) == 8
    resumed = Trainer(tiny_config(data, tmp_path / "resumed", adaptation)).train().history
    assert [r["step"] for r in resumed] == [8, 9, 10]
    for a, b in zip(resumed, full[8:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a["step"], a["loss"], b["loss"])
    # The export and what `dinov2-hf push` stages from a checkpoint agree on the resolution the run ended at:
    # 48 px after adaptation steps, 32 px for a checkpoint written before them.
    from transformers import AutoImageProcessor

    from dinov2_hf.hub import stage_upload

    def crop_size(folder):
        return AutoImageProcessor.from_pretrained(folder).crop_size["height"]

    assert crop_size(tmp_path / "full" / "export" / "transformers") == 48
    assert crop_size(stage_upload(tmp_path / "full" / "checkpoints" / "checkpoint-11", tmp_path / "stage-full", "stock").folder) == 48
    assert crop_size(stage_upload(tmp_path / "full" / "checkpoints" / "checkpoint-6", tmp_path / "stage-6", "stock").folder) == 32



def test_activation_checkpointing_keeps_the_trajectory(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    plain = Trainer(tiny_config(data, tmp_path / "plain", max_steps=3))
    checkpointed = Trainer(tiny_config(data, tmp_path / "checkpointed", max_steps=3, activation_checkpointing=True))
    backbone = checkpointed.accelerator.unwrap_model(checkpointed.model).student["backbone"]
    assert all(layer.gradient_checkpointing for layer in backbone.encoder.layer)
    for a, b in zip(plain.train().history, checkpointed.train().history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_gradient_accumulation_trains_on_micro_batches(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    trainer = Trainer(tiny_config(data, tmp_path / "run", max_steps=4, gradient_accumulation_steps=2, batch_size_per_device=8))
    history = trainer.train().history
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert trainer.batches_in_epoch % 2 == 0  # whole steps of two loader batches each
    assert all(math.isfinite(r["loss"]) for r in history)  # 0 micro-batches fails at load: test_config_errors.py


def test_training_step_accumulates_like_the_mean_loss():
    """Two micro-batches: one optimizer step and one EMA update with the gradient of the mean loss."""
    from test_objective import fake_batch
    from test_objective import tiny_config as tiny_ssl_config

    from dinov2_hf.objective import SSLMetaArch, build_schedules, param_groups
    from dinov2_hf.objective.step import training_step

    config = tiny_ssl_config()
    batches = [fake_batch(config, seed=0), fake_batch(config, seed=1)]
    states = []
    for accumulate in (True, False):
        torch.manual_seed(0)
        arch = SSLMetaArch(config).train()
        optimizer = torch.optim.AdamW(param_groups(arch.student))
        schedules = build_schedules(config.schedule, 8)
        if accumulate:
            record = training_step(arch, optimizer, batches, schedules, 2000, 3.0)
        else:  # the reference: both forward passes, one backward of the mean, then the usual update
            values = schedules.at(2000)
            from dinov2_hf.objective.param_groups import apply_schedules

            apply_schedules(optimizer, values["lr"], values["weight_decay"], values["last_layer_lr"])
            outs = [arch(b, teacher_temp=values["teacher_temp"]) for b in batches]
            ((outs[0]["loss"] + outs[1]["loss"]) / 2).backward()
            arch.clip_gradients(3.0)
            optimizer.step()
            arch.update_teacher(values["momentum"])
            reference_loss = float((outs[0]["loss"] + outs[1]["loss"]) / 2)
        states.append({k: v.clone() for k, v in arch.state_dict().items()})
    assert record["loss"] == pytest.approx(reference_loss, rel=1e-6)
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_train_puts_the_signal_handlers_back(cifar_dir, tmp_path):
    """SIGINT/SIGTERM stop training gracefully while it runs; afterwards (e.g. in a notebook, where an
    interrupt must raise KeyboardInterrupt in later cells) the previous handlers are back."""
    import signal

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=32)
    trainer = Trainer(tiny_config(data, tmp_path / "run", max_steps=1))
    during, train_step = {}, trainer.train_step

    def step(batch):
        during.update({signum: signal.getsignal(signum) for signum in before})
        return train_step(batch)

    trainer.train_step = step
    trainer.train()
    assert all(during[signum] is not before[signum] for signum in before), during
    assert {signum: signal.getsignal(signum) for signum in before} == before
