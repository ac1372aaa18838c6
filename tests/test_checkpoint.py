"""Atomic checkpoint folders: crashes never leave a half checkpoint, the newest complete one resumes."""

import pytest

from dinov2_hf.training.checkpoint import atomic_checkpoint, prune_checkpoints
from dinov2_hf.training.run_dir import checkpoint_step, latest_checkpoint, list_checkpoints


def write(root, step, payload="weights"):
    with atomic_checkpoint(root, step) as folder:
        (folder / "model.bin").write_text(f"{payload}-{step}")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    write(tmp_path, 10)
    with pytest.raises(RuntimeError):
        with atomic_checkpoint(tmp_path, 20) as folder:
            (folder / "model.bin").write_text("half")
            raise RuntimeError("killed while writing")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]
    assert (latest_checkpoint(tmp_path) / "model.bin").read_text() == "weights-10"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_incomplete_folders_are_ignored_and_pruned(tmp_path):
    write(tmp_path, 5)
    (tmp_path / "checkpoint-99").mkdir()  # no COMPLETE marker: e.g. a copy cut short
    (tmp_path / ".tmp-checkpoint-7-deadbeef").mkdir()  # a write killed by SIGKILL
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    removed = prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in removed] == [".tmp-checkpoint-7-deadbeef"]


def test_keep_last_and_ordering(tmp_path):
    for step in (100, 20, 3000, 400):
        write(tmp_path, step)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [20, 100, 400, 3000]
    prune_checkpoints(tmp_path, keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [400, 3000]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_rewriting_a_step_replaces_it_atomically(tmp_path):
    write(tmp_path, 50, "first")
    write(tmp_path, 50, "second")
    assert (latest_checkpoint(tmp_path) / "model.bin").read_text() == "second-50"
    assert len(list(tmp_path.iterdir())) == 1


def test_empty_root(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_line_elsewhere_is_named(tmp_path):
    import json

    from dinov2_hf.training.run_dir import RunDir

    run = RunDir(tmp_path)
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(3))
    run.metrics.write_text(rows + '{"step": 3, "lo')  # killed while writing step 3
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]
    run.truncate_metrics(2)
    assert run.metrics.read_text() == "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(2))
    run.metrics.write_text(rows.replace('{"step": 1', 'garbage {"step": 1'))
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a JSON record"):
        run.read_metrics()
