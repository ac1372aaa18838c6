"""The README's `dinov2-hf curate` command runs as shown (tiny random backbone, a few hundred CIFAR images;
in process: tests/cli_in_process.py)."""

from cli_in_process import run_cli
from test_readme import readme_cli_commands

# Counts fixed by the command itself; the others depend on the random backbone's float arithmetic.
EXACT = ("pool rows", "pool undecodable", "exact duplicates removed", "eval-set copies removed", "sampled",
         "curated written", "written", "wrote ")


def readme_curate_commands(subcommand: str = "curate") -> list[tuple[str, list[str]]]:
    return [(command, shown) for command, shown in readme_cli_commands() if command.split()[1] == subcommand]


def test_readme_curate_command_runs_as_shown(tmp_path, cifar_dir, capsys, monkeypatch):
    commands = readme_curate_commands()
    assert len(commands) == 1
    command, shown = commands[0]
    command = command.replace("../shared/data/cifar10", str(cifar_dir))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *command.split()[1:])
    assert code == 0, err[-2000:]
    printed = out.splitlines()
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
    code, out, err = run_cli(capsys, *command.split()[1:])
    assert code == 0, err[-2000:]
    assert out.splitlines() == shown
