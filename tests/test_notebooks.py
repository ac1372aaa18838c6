"""The example notebooks run top to bottom (nbclient, a fresh kernel of this interpreter, offline) through
``examples/run_notebooks.py``, as examples/README.md shows, and are committed without outputs."""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
EXAMPLES_README = (ROOT / "examples" / "README.md").read_text()

# Facts each notebook prints about itself, checked in its executed outputs (beyond "no cell failed").
EXPECTED = {
    "01_feature_extraction": [r"\(1, 257, 384\) equal to the direct call: True", r"336 px: \(3, 384, 24, 24\)",
                              r"pca: figures/pca_000\.png"],
    "02_knn_and_linear_probe": [r"500 images in [\d.]+ s, skipped 0", r"kNN top-1, k=20: [\d.]+%", r"linear probe top-1: [\d.]+%"],
    "03_pretrain_on_image_folder": [r"1797 images in my_images", r"step 20: loss [\d.]+, skipped images 0",
                                    r"exported backbone: [\d.]+%", r"max difference to the trained teacher (\S+)"],
    "04_distillation": [r"runs/student-paper: 12 steps", r"DistillMetaArch", r"runs/student-headless: 12 steps",
                        r"FeatureDistillMetaArch"],
}


def running_kernels() -> list:
    """This process's descendant kernels (a process that exits while being read, or a zombie, is not running)."""
    kernels = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "ipykernel_launcher" in child.cmdline():
                kernels.append(child)
        except psutil.Error:
            pass
    return kernels


def runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "examples" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_outputs(notebook: dict) -> str:
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join("".join(p) if isinstance(p, list) else p for p in parts)


def test_the_notebooks_are_there():
    names = [path.stem for path in NOTEBOOKS]
    assert names[:4] == list(EXPECTED), names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, capsys, monkeypatch):
    import nbformat

    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # Kernels of parallel workers share the cores: one thread each instead of spinning against each other.
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.setenv(variable, "1")

    # A first cell proves the kernel is this interpreter, offline, with this checkout's dinov2_hf.
    import dinov2_hf

    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(
        "import os, sys, dinov2_hf\n"
        f"assert sys.executable == {sys.executable!r}, sys.executable\n"
        "assert os.environ.get('HF_HUB_OFFLINE') == '1'\n"
        f"assert dinov2_hf.__file__ == {dinov2_hf.__file__!r}, dinov2_hf.__file__"
    ))
    copy = tmp_path / "in" / path.name
    copy.parent.mkdir()
    nbformat.write(notebook, copy)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest; the kernel inherits it
    status = runner().main([str(copy), "--save-executed", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert running_kernels() == []  # stopped after its last cell, not left running until the test session ends
    assert status == 0, printed[-5000:]
    code_cells = sum(cell.cell_type == "code" for cell in notebook.cells)
    assert re.fullmatch(rf"{re.escape(path.name)}: ok, {code_cells} code cells in \d+ s\n", printed), printed
    executed = json.loads((tmp_path / "out" / path.name).read_text())
    assert all(output["output_type"] != "error" for cell in executed["cells"] for output in cell.get("outputs", []))
    outputs = text_outputs(executed)
    for pattern in EXPECTED.get(path.stem, []):
        assert re.search(pattern, outputs), (pattern, outputs[-3000:])
    if path.stem == "03_pretrain_on_image_folder":  # the stock-transformers export computes the teacher's CLS
        difference = re.search(EXPECTED[path.stem][-1], outputs).group(1)
        assert float(difference) < 1e-4, difference


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name} cell {index} has outputs: run `python examples/run_notebooks.py --strip` before committing")
    assert any(cell["cell_type"] == "markdown" for cell in notebook["cells"])


def test_strip_removes_outputs_and_bad_paths_fail(tmp_path, capsys):
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    notebook.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    notebook.cells[0].execution_count = 1
    path = tmp_path / "x.ipynb"
    nbformat.write(notebook, path)
    module = runner()
    assert module.main([str(path), "--strip"]) == 0
    assert module.main([str(path), "--strip"]) == 0
    assert capsys.readouterr().out == "x.ipynb: stripped\nx.ipynb: already clean\n"
    cell = json.loads(path.read_text())["cells"][0]
    assert cell["outputs"] == [] and cell["execution_count"] is None and "".join(cell["source"]) == "print(1)"
    assert module.main([str(tmp_path / "missing.ipynb")]) == 2
    assert "not a file" in capsys.readouterr().err


def test_a_failing_cell_fails_the_run(tmp_path, capsys):
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('before')"),
                                               nbformat.v4.new_code_cell("raise ValueError('broken cell')")])
    path = tmp_path / "bad.ipynb"
    nbformat.write(notebook, path)
    assert runner().main([str(path)]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("bad.ipynb: FAILED") and "broken cell" in printed


def test_examples_readme_lists_every_notebook_as_the_runner_prints_it():
    """examples/README.md shows `python examples/run_notebooks.py` with one line per notebook, in order."""
    block = re.search(r"```text\n\$ python examples/run_notebooks.py\n(.*?)```", EXAMPLES_README, flags=re.S)
    assert block, "examples/README.md must show the run_notebooks.py command and its output"
    lines = block.group(1).splitlines()
    assert [line.split(":")[0] for line in lines] == [path.name for path in NOTEBOOKS]
    for line, path in zip(lines, NOTEBOOKS):
        cells = sum(cell["cell_type"] == "code" for cell in json.loads(path.read_text())["cells"])
        assert re.fullmatch(rf"{re.escape(path.name)}: ok, {cells} code cells in \d+ s", line), line
        assert f"[`{path.name}`](notebooks/{path.name})" in EXAMPLES_README, path.name
