"""The README's ``dinov2-hf eval`` commands run as shown (with the console script, as a user would)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from test_readme import readme_cli_commands


def test_readme_eval_commands_run_as_shown(tmp_path, cifar_dir):
    executable = shutil.which("dinov2-hf") or str(Path(sys.executable).parent / "dinov2-hf")
    commands = [(c, shown) for c, shown in readme_cli_commands() if c.split()[1] == "eval"]
    assert [c.split()[2] for c, _ in commands] == ["knn", "linear", "visualize"]
    for command, shown in commands:
        command = command.replace("../shared/data/cifar10", str(cifar_dir))
        result = subprocess.run([executable, *command.split()[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})  # see eval_threads.py
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        printed = result.stdout.splitlines()
        assert len(printed) == len(shown), (printed, shown)
        for line, expected in zip(printed, shown):
            name, _, value = expected.partition(": ")
            if value.replace(".", "", 1).isdigit():
                # accuracies: equal up to one test image (float summation order differs across machines)
                assert line.startswith(name + ": ") and abs(float(line.partition(": ")[2]) - float(value)) <= 0.006, (line, expected)
            else:
                assert line == expected
        assert (tmp_path / command.split("--output ")[1].split()[0]).is_file()
    assert len(list((tmp_path / "outputs" / "figures").glob("*.png"))) == 5
