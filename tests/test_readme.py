"""README.md stays true: its test command is what CI runs, and its CLI commands work as shown."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_meta_conversion import meta_state_dict

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_bash_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = fenced_bash_blocks()
    assert len(blocks) == 2, blocks
    main_command, test_command = blocks
    assert main_command.endswith("&& accelerate launch train.py")  # the quickstart: tests/test_quickstart.py
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines
    assert ci_lines.index(test_command) == len(ci_lines) - 1


def readme_cli_commands() -> list[tuple[str, list[str]]]:
    """Each ``$ dinov2-hf ...`` line of the README with the output lines shown under it."""
    commands = []
    for block in re.findall(r"```text\n(.*?)```", README, flags=re.S):
        current = None  # output lines belong to the command above them in the same block
        for line in block.splitlines():
            if line.startswith("$ dinov2-hf "):
                current = (line[2:], [])
                commands.append(current)
            elif current is not None:
                current[1].append(line)
    return commands


@pytest.mark.slow
def test_readme_cli_commands_run_as_shown(tmp_path, cifar_dir, monkeypatch, capsys):
    """The first command runs through the installed console script; the rest call the same ``main`` in this
    process (a process start imports torch and transformers, about 8 s of CPU each)."""
    from dinov2_hf.cli import main

    executable = shutil.which("dinov2-hf") or str(Path(sys.executable).parent / "dinov2-hf")
    assert Path(executable).exists(), "the dinov2-hf console script is not installed (pip install -e .)"
    # The README's input: a Meta-format file with the released ViT-S/14-reg4 shapes (random weights).
    torch.save(meta_state_dict(dim=384, depth=12, grid=37, registers=4), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    # eval, curate (with push-dataset) and the ONNX export have their own README tests
    # (test_eval_readme.py, test_curate_readme.py, test_onnx_export.py)
    commands = [c for c in readme_cli_commands()
                if c[0].split()[1] not in ("eval", "curate", "push-dataset") and "--to onnx" not in c[0]]
    assert [c.split()[1] for c, _ in commands] == ["demo", "train", "distill", "convert", "convert", "export", "demo", "push"]
    monkeypatch.chdir(tmp_path)
    # Run in dependency order: train writes distill's teacher and push's source; the export makes the second convert's input.
    for index in [0, 1, 2, 3, 5, 4, 6, 7]:
        command, shown = commands[index]
        argv = command.replace("../shared/data/cifar10", str(cifar_dir)).split()[1:]
        if index == 0:
            result = subprocess.run([executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600)
            returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
        else:
            returncode = main(argv)
            stdout, stderr = capsys.readouterr()
        assert returncode == 0, f"{command}\n{stderr[-2000:]}"
        printed = stdout.splitlines()
        for expected in shown:
            key = expected.split(":")[0]
            if key.strip() in ("cls_norm", "forward_seconds"):  # values of random weights and timings vary
                assert any(line.startswith(key) for line in printed), (command, key)
            elif expected.startswith("step "):  # the loss value depends on the machine's float arithmetic
                assert any(line.startswith(expected.split(":")[0]) and line.endswith(expected.split(";")[1]) for line in printed), (expected, printed)
            else:
                assert expected in printed, (command, expected, printed)


@pytest.mark.parametrize("args, message", [
    (["convert", "--from", "meta", "missing.pth", "out"], "is not a file"),
    (["export", "--to", "transformers", "missing-dir", "out"], "has no config.json"),
    (["demo", "--image", "nope.png"], "neither a file nor a built-in sample"),
])
def test_cli_errors_are_clear(tmp_path, monkeypatch, capsys, args, message):
    from dinov2_hf.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_example_feature_extraction_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "feature_extraction.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "equal to the direct call: True" in result.stdout
    assert "patch features: (2, 16, 16, 384)" in result.stdout
