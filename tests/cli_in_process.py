"""``dinov2-hf ARGS`` in the test's own process: the console script's ``main``, without the 8 s of CPU a new
process spends importing torch and transformers (tests/test_readme.py runs the console script itself)."""

from dinov2_hf.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``dinov2-hf ARGS`` (an uncaught exception fails the test)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err[-2000:]
    return code, captured.out, captured.err
