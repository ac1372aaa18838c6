"""The README's ``dinov2-hf eval`` commands run as shown (in process: tests/cli_in_process.py)."""

from cli_in_process import run_cli
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from test_readme import readme_cli_commands


def test_readme_eval_commands_run_as_shown(tmp_path, cifar_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = [(c, shown) for c, shown in readme_cli_commands() if c.split()[1] == "eval"]
    assert [c.split()[2] for c, _ in commands] == ["knn", "linear", "visualize"]
    for command, shown in commands:
        command = command.replace("../shared/data/cifar10", str(cifar_dir))
        code, out, err = run_cli(capsys, *command.split()[1:])
        assert code == 0, f"{command}\n{err[-2000:]}"
        printed = out.splitlines()
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
