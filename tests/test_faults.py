"""Fault injection across the commands: bad images, bad sources, damaged checkpoints, another architecture, a
finished run, signals through ``accelerate launch``. Each command ends with exit code 0 (bad inputs skipped and
counted) or 2 (a clear error naming the key, path or file, and the fix); no traceback; nothing a user wrote lost."""

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_trainer as trainer_tests
from bad_images import CORPUS, encoded
from cli_in_process import run_cli as run
from PIL import Image

from dinov2_hf.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNDECODABLE = sum(1 for *_, size in CORPUS if size is None)  # truncated, empty, text, oversized


# -- bad images: train, eval and curate skip and count them ---------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 8 good images each, and every kind of the bad-image corpus in class ``a``."""
    folder = tmp_path_factory.mktemp("images")
    for label, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (folder / label).mkdir()
        for i in range(8):
            image = Image.new("RGB", (40, 36), colour)
            image.paste((i * 30, 255 - i * 30, 90), (i * 4, 0, i * 4 + 6, 36))
            (folder / label / f"{i}.png").write_bytes(encoded(image, "PNG"))
    for _, filename, data, _ in CORPUS:
        (folder / "a" / filename).write_bytes(data)
    return folder


def test_train_skips_and_counts_every_bad_image(image_folder, tmp_path, capsys):
    overrides = trainer_tests.tiny_overrides(image_folder, tmp_path / "run", max_steps=2)
    good = 16 + len(CORPUS) - UNDECODABLE
    # Two batches take the whole folder: every bad image is met once in the pass
    code, out, _ = run(capsys, "train", "--config", "cifar10", *overrides, f"train.batch_size_per_device={good // 2}")
    assert code == 0
    assert f"skipped images {UNDECODABLE};" in out, out
    assert (tmp_path / "run" / "export" / "transformers" / "model.safetensors").is_file()


def test_eval_skips_and_counts_every_bad_image(image_folder, tmp_path, capsys):
    output = tmp_path / "knn.json"
    code, out, _ = run(capsys, "eval", "knn", "--preset", "tiny", "--dataset", image_folder, "--test-dataset",
                       image_folder, "--test-split", "train", "--resize-size", "32", "--crop-size", "28", "--ks", "3",
                       "--no-progress", "--output", output)
    assert code == 0, out
    counts = json.loads(output.read_text())["dataset"]
    assert f"({2 * UNDECODABLE} undecodable or oversized images skipped)" in out
    assert counts["skipped_images"] == 2 * UNDECODABLE and counts["train_images"] == 16 + len(CORPUS) - UNDECODABLE


def test_curate_skips_and_counts_every_bad_image(image_folder, tmp_path, capsys):
    code, out, _ = run(capsys, "curate", f"pool.source={image_folder}", "embed.preset=tiny", "embed.image_size=28",
                       "embed.overrides.layerscale_value=1.0", "cluster.levels=[4,2]", "cluster.resampling_steps=[1,1]",
                       "cluster.sample_sizes=[2,2]", "dedup.near=false", "sample.target_size=6",
                       f"output.output_dir={tmp_path / 'curated'}")
    assert code == 0, out
    manifest = (tmp_path / "curated" / "manifest.csv").read_text().splitlines()
    assert len(manifest) - 1 == 6
    assert f"pool undecodable: {UNDECODABLE}\n" in out, out


# -- sources and model files that are not what they should be -------------------------------------------------


def test_a_missing_relative_source_names_both_readings_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import dinov2_hf.training.trainer as trainer_module

    def no_build(config):
        raise AssertionError("the model was built before the source was checked")

    monkeypatch.setattr(trainer_module, "build_arch", no_build)
    code, _, err = run(capsys, "train", "data.source=my_images", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "data.source='my_images': there is no such folder or file" in err and "as a Hub dataset id" in err
    code, _, err = run(capsys, "train", "monitor.source=no_such_dir", "monitor.every=5", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and "monitor.source='no_such_dir'" in err


def test_eval_errors_name_eval_flags(image_folder, tmp_path, capsys):
    base = ["eval", "knn", "--preset", "tiny", "--dataset", image_folder, "--test-dataset", image_folder]
    code, _, err = run(capsys, *base)
    assert code == 2 and "--test-split 'test'" in err and "pass --test-split" in err  # a folder has one split
    code, _, err = run(capsys, *base, "--test-split", "train", "--label-column", "class")
    assert code == 2 and "--label-column 'class' is not a column of --dataset" in err and "data." not in err
    code, _, err = run(capsys, *base, "--test-split", "train", "--model", "someone/dinov2-offline")
    assert code == 2 and "someone/dinov2-offline" in err and "HF_HUB_OFFLINE" in err


@pytest.mark.parametrize("damage", ["truncated weights", "not a tensor file"])
def test_damaged_model_folders_are_clear_errors(damage, tmp_path, capsys):
    from dinov2_hf.modeling import Dinov2HFConfig, Dinov2HFModel

    folder = tmp_path / "model"
    Dinov2HFModel(Dinov2HFConfig.from_preset("tiny")).save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        weights.write_text("not a safetensors file")
    for args in (["export", "--to", "transformers", folder, tmp_path / "out"], ["demo", "--model", folder]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "model.safetensors" in err, (args, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "text", "bare tensor"])
def test_damaged_meta_checkpoints_are_clear_errors(damage, tmp_path, capsys):
    import torch

    path = tmp_path / "weights.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8)} if damage == "truncated" else torch.zeros(3), path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "text":
        path.write_text("not a checkpoint")
    for args in (["convert", "--from", "meta", path, tmp_path / "out"], ["demo", "--model", path]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "weights.pth" in err, (args, err)
    assert not (tmp_path / "out").exists()


# -- checkpoints: damaged, of another architecture, a finished run ---------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(cifar_dir, tmp_path_factory):
    """A tiny run stopped at step 4 of 6, with checkpoints 2 and 4 and its per-step metrics."""
    base = tmp_path_factory.mktemp("base")
    data = trainer_tests.write_cifar_subset(cifar_dir, base / "data", rows=64)
    overrides = trainer_tests.tiny_overrides(data, base / "run", max_steps=6, save_every=2, stop_at_step=4)
    assert main(["train", "--config", "cifar10", *overrides]) == 0
    return base, overrides


def copy_run(stopped_run, tmp_path) -> tuple[Path, list[str], list[dict]]:
    base, overrides = stopped_run
    shutil.copytree(base / "run", tmp_path / "run")
    overrides = [o.replace(str(base / "run"), str(tmp_path / "run")) for o in overrides]
    metrics = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp_path / "run", overrides, metrics


class Malicious:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


DAMAGES = {
    "truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "truncated optimizer": ("optimizer.bin", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "truncated rng states": ("random_states_0.pkl", lambda p: p.write_bytes(p.read_bytes()[:40])),
    "malicious rng states": ("random_states_0.pkl", lambda p: p.write_bytes(pickle.dumps(Malicious()))),
    "garbled trainer state": ("trainer_state.json", lambda p: p.write_text('{"step": 4, "ep')),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, stopped_run, tmp_path, capsys, caplog,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_folder, overrides, metrics = copy_run(stopped_run, tmp_path)
    filename, spoil = DAMAGES[damage]
    spoil(run_folder / "checkpoints" / "checkpoint-4" / filename)
    with caplog.at_level(logging.WARNING):
        code, out, _ = run(capsys, "train", "--config", "cifar10", *overrides)
    assert code == 0
    assert f"checkpoint-4 is damaged ({filename}" in caplog.text and "resuming from the checkpoint before it" in caplog.text
    assert "resumed from" in out and "checkpoint-2 (step 2 of 6)" in out
    kept = [p.name for p in (run_folder / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(kept) == 1 and (run_folder / "checkpoints" / kept[0] / filename).is_file()  # moved aside, not deleted
    rerun = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rerun] == [0, 1, 2, 3]
    assert [r["loss"] for r in rerun] == [r["loss"] for r in metrics]  # steps 2-3 again, on the same trajectory
    assert not (tmp_path / "pwned").exists()


def test_a_named_damaged_checkpoint_is_an_error_naming_the_file(stopped_run, tmp_path, capsys):
    run_folder, overrides, _ = copy_run(stopped_run, tmp_path)
    checkpoint = run_folder / "checkpoints" / "checkpoint-4"
    DAMAGES["truncated weights"][1](checkpoint / "model.safetensors")
    code, _, err = run(capsys, "train", "--config", "cifar10", *overrides, f"train.resume={checkpoint}")
    assert code == 2 and f"train.resume={checkpoint} cannot be resumed: model.safetensors" in err
    assert checkpoint.is_dir()


def test_a_run_folder_of_another_architecture_is_refused_naming_the_difference(stopped_run, tmp_path, capsys):
    run_folder, overrides, _ = copy_run(stopped_run, tmp_path)
    before = sorted(p.name for p in (run_folder / "checkpoints").iterdir())
    code, _, err = run(capsys, "train", "--config", "cifar10", *overrides, "model.overrides.hidden_size=64")
    assert code == 2
    assert "holds a run of another configuration" in err and "model.overrides.hidden_size: 48 -> 64" in err
    assert "train.resume=none" in err and "train.output_dir" in err
    assert sorted(p.name for p in (run_folder / "checkpoints").iterdir()) == before


def test_a_finished_run_rerun_does_nothing_and_says_where_its_results_are(stopped_run, tmp_path, capsys):
    run_folder, overrides, _ = copy_run(stopped_run, tmp_path)
    overrides = [o for o in overrides if not o.startswith("train.stop_at_step")]
    code, out, _ = run(capsys, "train", "--config", "cifar10", *overrides)
    assert code == 0 and "resumed from" in out and "exported to" in out
    weights = run_folder / "export" / "transformers" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    code, out, _ = run(capsys, "train", "--config", "cifar10", *overrides)
    assert code == 0
    assert f"{run_folder} holds a complete run (6 of 6 steps); nothing to do." in out
    assert "step 6: loss" in out and f"export: {run_folder / 'export'}" in out
    assert weights.stat().st_mtime_ns == stamp


# -- signals through accelerate launch (README's command) ------------------------------------------------------


SIGNALS = {"SIGTERM to the launcher": 143, "Ctrl-C to the process group": 130, "the launcher killed": -signal.SIGKILL}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(SIGNALS))
def test_a_signal_to_accelerate_launch_checkpoints_and_returns_after_it(how, cifar_dir, tmp_path):
    data = trainer_tests.write_cifar_subset(cifar_dir, tmp_path / "data", rows=64)
    # One DataLoader worker: the launcher signals the whole process tree, and the worker must survive it.
    overrides = trainer_tests.tiny_overrides(data, tmp_path / "run", max_steps=100000, save_every=100000, num_workers=1)
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    process = subprocess.Popen(
        [launcher, "launch", "--num_processes", "1", "--cpu", "--num_cpu_threads_per_process", "1",
         str(ROOT / "train.py"), "--config", "cifar10", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # As from a shell: Ctrl-C raises KeyboardInterrupt in the launcher (pytest-xdist workers ignore SIGINT,
        # and a child inherits that, so the launcher would never see the interrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a bound on a hang, not a timing assertion
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # the event: three steps logged
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.2)
    if how.startswith("SIGTERM"):
        process.send_signal(signal.SIGTERM)
    elif how.startswith("Ctrl-C"):
        os.killpg(process.pid, signal.SIGINT)
    else:  # no signal is passed on: the trainer gets SIGTERM as its parent dies (PR_SET_PDEATHSIG)
        process.kill()
    out, err = process.communicate(timeout=300)  # stdout ends when the trainer, which shares it, has exited too
    assert process.returncode == SIGNALS[how], err[-2000:]
    assert (tmp_path / "run" / "checkpoints").is_dir(), (out, err[-3000:])
    checkpoints = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").is_file()  # complete when the launcher returned
    stopped = [line for line in out.splitlines() if line.startswith("stopped by signal")]
    assert len(stopped) == 1 and str(checkpoints[0]) in stopped[0]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    leftover = subprocess.run(["pgrep", "-f", f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # no orphaned trainer
