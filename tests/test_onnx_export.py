"""ONNX export: onnxruntime against PyTorch (ours and stock transformers) at several sizes and batch sizes."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from test_meta_conversion import meta_state_dict
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.cli import main
from dinov2_hf.modeling.onnx import bicubic_matrix, check_onnx, export_onnx, require_onnx_packages
from dinov2_hf.modeling.processor import dinov2_image_processor

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def run_onnx(path: Path, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"pixel_values": pixel_values.numpy()})))


def assert_matches(path: Path, reference: torch.nn.Module, sizes) -> None:
    """onnxruntime vs ``reference`` (a PyTorch model with transformers' outputs) on random images."""
    generator = torch.Generator().manual_seed(1)
    for batch, height, width in sizes:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = reference(pixel_values)
        got = run_onnx(path, pixel_values)
        for name in ("last_hidden_state", "pooler_output"):
            want = getattr(expected, name).numpy()
            assert got[name].shape == want.shape, (name, height, width)
            difference = np.abs(got[name] - want).max()
            assert difference < TOLERANCE, (name, batch, height, width, difference)


# The traced example is batch 2 of a 28x42 image; these differ in batch and size. The tiny models
# have a native 224 px grid (16x16), where eager code skips the resize; 224x322 keeps one side native.
SIZES = [(1, 224, 224), (3, 154, 322), (1, 224, 322), (4, 14, 28)]


@pytest.mark.parametrize(
    "interpolation, registers", [("transformers", 0), ("antialias", 4), ("meta", 0), ("meta", 4)]
)
def test_onnx_matches_pytorch_at_any_size(tiny_kwargs, tmp_path, interpolation, registers):
    config = Dinov2HFConfig(
        **tiny_kwargs,
        num_register_tokens=registers,
        pos_embed_interpolation=interpolation,
        use_swiglu_ffn=interpolation == "antialias",  # ViT-g's feed-forward
    )
    model = randomize_(Dinov2HFModel(config)).eval()
    external = interpolation == "meta" and registers == 4  # also cover weights stored beside the graph
    path = export_onnx(model, tmp_path / "onnx", external_data=external)
    assert (tmp_path / "onnx" / "model.onnx.data").is_file() == external
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input]
    assert [v.name for v in graph.input] == ["pixel_values"] and dims == [["batch", 3, "height", "width"]]
    assert [v.name for v in graph.output] == ["last_hidden_state", "pooler_output"]
    assert_matches(path, model, SIZES)
    if interpolation == "transformers":  # check_onnx (behind --check) agrees, and can fail
        assert max(check_onnx(path, model).values()) < TOLERANCE
        other = randomize_(Dinov2HFModel(model.config), seed=1).eval()
        assert max(check_onnx(path, other).values()) > 0.1
        with pytest.raises(ValueError, match="not a multiple of the patch size 14; use e.g. 98x224"):
            check_onnx(path, model, sizes=[(100, 224)])


def test_bicubic_matrix_is_pytorchs_bicubic_resize():
    """The "meta" mode's in-graph weights reproduce F.interpolate with Meta's scale factors, 37-wide grid included."""
    generator = torch.Generator().manual_seed(0)
    for native in (4, 37):
        grid = torch.randn(1, 8, native, native, generator=generator)
        for height, width in [(native, native + 3), (5, 7), (2 * native + 1, 1)]:
            scale = ((height + 0.1) / native, (width + 0.1) / native)
            expected = F.interpolate(grid, scale_factor=scale, mode="bicubic")
            rows = bicubic_matrix(height, native, torch.tensor(native / (height + 0.1), dtype=torch.float64).float())
            cols = bicubic_matrix(width, native, torch.tensor(native / (width + 0.1), dtype=torch.float64).float())
            got = torch.einsum("hn,bcnm,wm->bchw", rows, grid, cols)
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_cli_from_stock_transformers_folder(tiny_kwargs, tmp_path, registers):
    """A stock Dinov2Model / Dinov2WithRegistersModel folder in, compared with the stock model itself."""
    if registers:
        stock = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=registers))
    else:
        stock = Dinov2Model(Dinov2Config(**tiny_kwargs))
    stock = randomize_(stock).eval()
    stock.save_pretrained(tmp_path / "stock")
    dinov2_image_processor(crop_size=112).save_pretrained(tmp_path / "stock")  # the folder's own preprocessing is kept
    assert main(["export", "--to", "onnx", str(tmp_path / "stock"), str(tmp_path / "onnx")]) == 0
    assert_matches(tmp_path / "onnx" / "model.onnx", stock, [(2, 224, 224), (1, 154, 322)])
    config = AutoConfig.from_pretrained(tmp_path / "onnx")
    assert config.model_type == stock.config.model_type and getattr(config, "num_register_tokens", 0) == registers
    processor = AutoImageProcessor.from_pretrained(tmp_path / "onnx")
    assert processor.crop_size.height == 112 and processor.size.shortest_edge == 128


def test_cli_check_output_and_its_failure(tiny_kwargs, tmp_path, capsys):
    folder = tmp_path / "ours"
    randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs, num_register_tokens=4))).eval().save_pretrained(folder)
    args = ["export", "--to", "onnx", str(folder), str(tmp_path / "onnx"), "--check-size", "98x210", "--check-size", "224"]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"Exported {folder} -> {tmp_path / 'onnx' / 'model.onnx'} (opset 18;")
    values = dict(re.match(r"  (\S+): (\S+)$", line).groups() for line in printed[2:])
    assert sorted(values) == sorted(f"{o}@{s}" for o in ("last_hidden_state", "pooler_output") for s in ("98x210", "224x224"))
    assert all(float(v) < TOLERANCE for v in values.values())
    # The check can fail: a zero tolerance is exceeded by float rounding alone.
    assert main([*args, "--atol", "0", "--opset", "20"]) == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).opset_import[0].version == 20


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--check-size", "100x100"], "Check size 100x100 is not a multiple of the patch size 14; use e.g. 98x98"),
        (["--check-size", "big"], "is not HEIGHTxWIDTH"),
        (["--opset", "17"], "opset 17 is not supported: use 18 to 23"),
    ],
)
def test_cli_rejects_bad_arguments_before_loading(tiny_kwargs, tmp_path, monkeypatch, capsys, extra, message):
    folder = tmp_path / "ours"
    Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)).save_pretrained(folder)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr("dinov2_hf.modeling.loading.load_backbone", no_loading)
    assert main(["export", "--to", "onnx", str(folder), str(tmp_path / "onnx"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing-dir", "does not exist: pass a checkpoint folder, a Meta .pth file or a Hub model id"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "has no config.json"),
        (lambda tmp: (tmp / "w.txt").write_text("x") and tmp / "w.txt", "is a file but not a Meta checkpoint (.pth)"),
    ],
)
def test_cli_rejects_bad_inputs(tmp_path, monkeypatch, capsys, make, message):
    monkeypatch.chdir(tmp_path)
    source = make(tmp_path)
    assert main(["export", "--to", "onnx", str(source.relative_to(tmp_path)), "out"]) == 2
    assert message in capsys.readouterr().err


def test_missing_onnx_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r'pip install "dinov2-hf\[onnx\]"'):
        require_onnx_packages()


def readme_onnx_commands() -> list[tuple[str, list[str]]]:
    """The README's ``$ dinov2-hf export --to onnx`` lines with the output shown under each."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```text\n(.*?)```", readme, flags=re.S):
        lines = block.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("$ dinov2-hf export --to onnx "):
                shown = []
                for following in lines[index + 1 :]:
                    if following.startswith("$ "):
                        break
                    shown.append(following)
                commands.append((line[2:], shown))
    return commands


@pytest.mark.slow
def test_readme_onnx_command_runs_as_shown(tmp_path):
    executable = shutil.which("dinov2-hf") or str(Path(sys.executable).parent / "dinov2-hf")
    assert Path(executable).exists(), "the dinov2-hf console script is not installed (pip install -e .)"
    commands = readme_onnx_commands()
    assert len(commands) == 1
    command, shown = commands[0]
    # The README's input: a Meta-format file with the released ViT-S/14-reg4 shapes (random weights).
    torch.save(meta_state_dict(dim=384, depth=12, grid=37, registers=4), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    result = subprocess.run([executable, *command.split()[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()
    assert len(printed) == len(shown), (printed, shown)
    for got, expected in zip(printed, shown):
        difference = re.match(r"  (\S+@\d+x\d+): (\S+)$", expected)
        if difference:  # float rounding differs between machines: same key, within the tolerance
            key, value = re.match(r"  (\S+@\d+x\d+): (\S+)$", got).groups()
            assert key == difference.group(1) and float(value) < TOLERANCE, (got, expected)
        else:
            assert got == expected
    assert json.loads((tmp_path / "outputs" / "vits14-reg4-onnx" / "config.json").read_text())["model_type"] == "dinov2_with_registers"
