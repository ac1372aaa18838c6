"""Two CPU processes through `accelerate launch train.py`: DDP, and FSDP2 with the shipped FSDP config.

Both average gradients over the same two ranks' data, so their loss trajectories agree; the FSDP2
run writes sharded checkpoints, resumes from them onto the same trajectory, and exports the full
teacher, which loads in stock transformers and equals the DDP run's export. Distillation from the DDP
run's checkpoint agrees too, its frozen teacher sharded block by block like the student; the FSDP2
run's sharded checkpoint loads as the same teacher.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import write_cifar_subset

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
DDP_CONFIG = ROOT / "examples" / "accelerate" / "ddp.yaml"


# Slow; conftest's scheduler runs the whole module on one worker (its module-scoped fixture starts processes).
pytestmark = pytest.mark.slow


def launch(data: Path, output: Path, max_steps: int, config_file: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    command = [
        launcher, "launch", "--config_file", str(config_file), "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "train.py"), "--config", "cifar10", f"data.source={data}", "data.shuffle_buffer=16",
        "model.overrides.hidden_size=48", "model.overrides.num_hidden_layers=2", "model.overrides.num_attention_heads=2",
        "model.drop_path_rate=0.0", "dino.head_n_prototypes=128", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
        "ibot.head_n_prototypes=128", "crops.local_crops_number=2", "schedule.epochs=4", "schedule.epoch_length=2",
        "schedule.warmup_epochs=1", "train.batch_size_per_device=8", "train.num_workers=0", "train.mixed_precision=no",
        "train.save_every=2", f"train.max_steps={max_steps}", f"train.output_dir={output}", *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    data = write_cifar_subset(cifar_dir, tmp / "data", rows=96)
    # The FSDP2 run is "killed" after step 2 and run again: it resumes from its sharded checkpoint (every launch
    # starts three processes, each importing torch and transformers: one run serves both checks).
    results = {"ddp": launch(data, tmp / "ddp", 4, DDP_CONFIG),
               "fsdp_stopped": launch(data, tmp / "fsdp", 4, FSDP_CONFIG, ("train.stop_at_step=2",))}
    results["fsdp"] = launch(data, tmp / "fsdp", 4, FSDP_CONFIG)
    return tmp, results


def test_ddp_two_processes_train_and_export(runs):
    tmp, results = runs
    assert "step 4: loss" in results["ddp"].stdout
    assert "2 processes (MULTI_CPU, DDP) on cpu" in results["ddp"].stdout
    assert "2 processes (MULTI_CPU, FSDP2) on cpu" in results["fsdp"].stdout
    assert "resumed from" in results["fsdp"].stdout and "step 4: loss" not in results["fsdp_stopped"].stdout
    assert len(losses(tmp / "ddp")) == 4
    assert (tmp / "ddp" / "export" / "transformers" / "model.safetensors").is_file()


def test_fsdp2_matches_ddp_step_for_step_and_resumes_from_its_shards_on_the_trajectory(runs):
    """Steps 1-2 before the stop and 3-4 after the resume follow the uninterrupted DDP run."""
    tmp, _ = runs
    fsdp, ddp = losses(tmp / "fsdp"), losses(tmp / "ddp")
    assert len(fsdp) == 4
    assert fsdp == pytest.approx(ddp, rel=1e-4, abs=1e-5)
    for step in (2, 4):
        checkpoint = tmp / "fsdp" / "checkpoints" / f"checkpoint-{step}"
        assert (checkpoint / "sharded" / ".metadata").is_file()
        assert sorted(p.name for p in checkpoint.glob("torch_rng_*.pt")) == ["torch_rng_0.pt", "torch_rng_1.pt"]


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp2", "fsdp2_multinode"])
def test_example_accelerate_configs_load(name):
    """Every shipped config parses with Accelerate's own loader (the GPU ones cannot run here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16"
    if name.startswith("fsdp2"):
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Dinov2HFLayer"
    if name == "fsdp2_multinode":
        assert config.num_machines * 8 == config.num_processes
        assert config.parallelism_config["parallelism_config_dp_replicate_size"] == config.num_machines


def test_fsdp2_export_is_the_full_teacher(runs):
    from transformers import AutoModel

    tmp, _ = runs
    fsdp = AutoModel.from_pretrained(tmp / "fsdp" / "export" / "transformers")
    ddp = AutoModel.from_pretrained(tmp / "ddp" / "export" / "transformers")
    assert type(fsdp).__name__ in ("Dinov2Model", "Dinov2WithRegistersModel")
    fsdp_state, ddp_state = fsdp.state_dict(), ddp.state_dict()
    assert fsdp_state.keys() == ddp_state.keys()
    for name, value in fsdp_state.items():
        torch.testing.assert_close(value, ddp_state[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp2_distillation_shards_the_frozen_teacher_and_matches_ddp(runs):
    tmp, _ = runs
    data = tmp / "data"
    student = ("model.overrides.hidden_size=32", f"distill.teacher={tmp / 'ddp' / 'checkpoints' / 'checkpoint-4'}")
    ddp = launch(data, tmp / "distill_ddp", 3, DDP_CONFIG, student)
    fsdp = launch(data, tmp / "distill_fsdp", 3, FSDP_CONFIG, student)
    assert "step 3: loss" in ddp.stdout and "2 processes (MULTI_CPU, FSDP2) on cpu" in fsdp.stdout
    assert losses(tmp / "distill_fsdp") == pytest.approx(losses(tmp / "distill_ddp"), rel=1e-4, abs=1e-5)
    sharded = tmp / "distill_fsdp" / "checkpoints" / "checkpoint-2" / "sharded" / ".metadata"
    assert sharded.is_file()
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(sharded.parent)).read_metadata().state_dict_metadata
    teacher_weights = [key for key in saved if "teacher.backbone.encoder.layer.0." in key and key.endswith("weight")]
    assert teacher_weights, sorted(saved)[:20]
    for key in teacher_weights:  # each rank wrote its own shard of the frozen teacher's blocks
        assert len(saved[key].chunks) == 2, (key, saved[key].chunks)
    # An FSDP2 run's sharded checkpoint is a teacher too: the same weights as the DDP run's.
    from dinov2_hf.training.build import load_teacher

    from_shards, _ = load_teacher(tmp / "fsdp" / "checkpoints" / "checkpoint-4")
    from_ddp, _ = load_teacher(tmp / "ddp" / "checkpoints" / "checkpoint-4")
    assert not (tmp / "fsdp" / "checkpoints" / "checkpoint-4" / "model.safetensors").exists()
    for name, value in from_ddp.state_dict().items():
        torch.testing.assert_close(from_shards.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
