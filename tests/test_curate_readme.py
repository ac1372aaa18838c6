"""The README's `dinov2-hf curate` command runs as shown (tiny random backbone, a few hundred CIFAR images)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Counts fixed by the command itself; the others depend on the random backbone's float arithmetic.
EXACT = ("pool rows", "pool undecodable", "exact duplicates removed", "eval-set copies removed", "sampled",
         "curated written", "written", "wrote ")


def readme_curate_commands(subcommand: str = "curate") -> list[tuple[str, list[str]]]:
    commands = []
    for block in re.findall(r"```text\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ dinov2-hf "):
                commands.append((line[2:], []))
            elif commands:
                commands[-1][1].append(line)
    return [(command, shown) for command, shown in commands if command.split()[1] == subcommand]


def test_readme_curate_command_runs_as_shown(tmp_path, cifar_dir):
    commands = readme_curate_commands()
    assert len(commands) == 1
    command, shown = commands[0]
    command = command.replace("../shared/data/cifar10", str(cifar_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "dinov2_hf.cli", *command.split()[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()
    assert [line.split(":")[0] for line in printed] == [line.split(":")[0] for line in shown]  # nothing left out
    for expected in shown:
        if expected.strip().startswith(EXACT):
            assert expected in printed, (expected, printed)
        else:
            key = expected.split(":")[0]
            assert any(line.startswith(key + ":") for line in printed), (key, printed)
    assert (tmp_path / "outputs" / "curated-demo" / "data" / "train-00000-of-00001.parquet").is_file()
    # the README's push-dataset example publishes this output (--dry-run: no token or network)
    [(command, shown)] = readme_curate_commands("push-dataset")
    result = subprocess.run([sys.executable, "-m", "dinov2_hf.cli", *command.split()[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == shown
