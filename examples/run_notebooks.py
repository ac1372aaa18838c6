"""Run the example notebooks top to bottom, headless, and report each one's wall time.

    python examples/run_notebooks.py                       # every notebook in examples/notebooks
    python examples/run_notebooks.py examples/notebooks/01_feature_extraction.ipynb
    python examples/run_notebooks.py --save-executed out/  # keep the executed copies (with outputs)
    python examples/run_notebooks.py --strip               # remove outputs before committing

Each notebook runs with nbclient in a fresh kernel of this interpreter (whatever kernel specs are
installed elsewhere), in its own empty working folder, so what it writes never lands in the
repository. A cell error stops that notebook and makes the exit status 1. Needs nbclient and
ipykernel (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
KERNEL_NAME = "dinov2-hf-examples"


def kernel_spec_manager(folder: Path):
    """A kernel spec manager that knows one kernel: ipykernel on ``sys.executable``.

    The stock ``python3`` spec may point at another interpreter (a user-level install); this one
    cannot, so the notebooks see the packages of the environment that runs them.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    spec = folder / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }))
    return KernelSpecManager(kernel_dirs=[str(folder)], ensure_native_kernel=False)


def kernel_environment() -> dict[str, str]:
    """This process's environment, with ``dinov2_hf``'s source folder first on PYTHONPATH, so the
    kernel imports the same copy of the package even from another working folder."""
    import importlib.util

    env = dict(os.environ)
    spec = importlib.util.find_spec("dinov2_hf")  # locates the package without importing torch
    if spec is not None and spec.origin:
        source = str(Path(spec.origin).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([source, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def run_notebook(path: str | Path, workdir: str | Path, timeout: int = 600):
    """Execute the notebook at ``path`` with ``workdir`` as its working folder; returns the executed
    notebook. Raises ``nbclient.exceptions.CellExecutionError`` naming the failing cell."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="kernels-") as kernels:
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager(Path(kernels)))
        # The kernel is stopped once the last cell has run (nbclient keeps a kernel it was handed alive until
        # interpreter exit: a loop over notebooks would pile them up).
        client = NotebookClient(notebook, km=manager, timeout=timeout, resources={"metadata": {"path": str(workdir)}},
                                shutdown_kernel="immediate")
        client.execute(env=kernel_environment(), cleanup_kc=True)
    return notebook


def strip_outputs(path: str | Path) -> bool:
    """Remove outputs and execution counts in place; True when the file changed."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    before = nbformat.writes(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    after = nbformat.writes(notebook)
    if after != before:
        Path(path).write_text(after)
    return after != before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every examples/notebooks/*.ipynb)")
    parser.add_argument("--save-executed", metavar="DIR", help="write the executed notebooks (with outputs) to DIR")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    parser.add_argument("--strip", action="store_true", help="strip outputs in place instead of running")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"run_notebooks: error: not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.strip:
        for path in paths:
            print(f"{path.name}: {'stripped' if strip_outputs(path) else 'already clean'}")
        return 0

    from nbclient.exceptions import CellExecutionError

    failed = 0
    for path in paths:
        with tempfile.TemporaryDirectory(prefix=f"{path.stem}-") as workdir:
            start = time.perf_counter()
            try:
                executed = run_notebook(path, workdir, args.timeout)
            except CellExecutionError as error:
                failed += 1
                print(f"{path.name}: FAILED after {time.perf_counter() - start:.0f} s\n{error}", flush=True)
                continue
            cells = sum(cell.cell_type == "code" for cell in executed.cells)
            print(f"{path.name}: ok, {cells} code cells in {time.perf_counter() - start:.0f} s", flush=True)
        if args.save_executed:
            import nbformat

            Path(args.save_executed).mkdir(parents=True, exist_ok=True)
            nbformat.write(executed, Path(args.save_executed) / path.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
