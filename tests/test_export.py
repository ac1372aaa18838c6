"""Round trips and exports: ours <-> transformers, stock loading, trust_remote_code, processor, pipeline."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.modeling.convert_transformers import from_transformers, to_transformers
from dinov2_hf.modeling.save import export_transformers, save_ours


def tiny_model(tiny_kwargs, **overrides):
    return randomize_(Dinov2HFModel(Dinov2HFConfig(**{**tiny_kwargs, **overrides}))).eval()


@pytest.mark.parametrize("overrides", [{}, {"num_register_tokens": 4}, {"use_swiglu_ffn": True}, {"pos_embed_interpolation": "antialias"}])
def test_round_trip_is_exact(tiny_kwargs, overrides):
    ours = tiny_model(tiny_kwargs, **overrides)
    back = from_transformers(to_transformers(ours))
    original, returned = ours.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    assert back.config.pos_embed_interpolation == ours.config.pos_embed_interpolation


@pytest.mark.parametrize("swiglu", [False, True])
def test_local_legacy_checkpoint_folder(tiny_kwargs, tmp_path, swiglu):
    """A folder laid out like facebook/dinov2-small (legacy keys in model.safetensors) converts and matches:
    transformers renames the legacy keys on load (the SwiGLU ones as facebook/dinov2-giant holds them)."""
    reference = randomize_(Dinov2Model(Dinov2Config(**{**tiny_kwargs, "use_swiglu_ffn": swiglu}))).eval()
    reference.config.save_pretrained(tmp_path)
    legacy = {}
    for key, value in reference.state_dict().items():
        key = key.replace("attention.q_proj", "attention.attention.query").replace("attention.k_proj", "attention.attention.key")
        key = key.replace("attention.v_proj", "attention.attention.value").replace("attention.o_proj", "attention.output.dense")
        key = key.replace("mlp.down_proj", "mlp.weights_out")
        legacy[key] = value.contiguous()
    for key in [k for k in legacy if ".mlp.gate_proj." in k]:  # gate and up fused, as on disk
        legacy[key.replace("gate_proj", "weights_in")] = torch.cat([legacy.pop(key), legacy.pop(key.replace("gate_proj", "up_proj"))])
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = from_transformers(tmp_path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).last_hidden_state, reference(x).last_hidden_state, rtol=0, atol=1e-5)


def test_meta_interpolation_warns_on_export(tiny_kwargs, caplog):
    ours = tiny_model(tiny_kwargs, pos_embed_interpolation="meta")
    with caplog.at_level("WARNING"):
        stock = to_transformers(ours)
    assert "native" in caplog.text
    x = torch.randn(1, 3, 224, 224)  # native size: identical
    with torch.no_grad():
        torch.testing.assert_close(stock(x).last_hidden_state, ours(x).last_hidden_state, rtol=0, atol=1e-5)


def run_isolated(code: str, cwd) -> dict:
    """Run ``code`` in a fresh interpreter that cannot import dinov2_hf; it prints one JSON line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    guard = "import sys\nsys.modules['dinov2_hf'] = None  # make sure nothing of ours is importable\n"
    result = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("registers", [0, 4])
def test_stock_automodel_processor_and_pipeline(tiny_kwargs, tmp_path, registers):
    ours = tiny_model(tiny_kwargs, num_register_tokens=registers)
    export_transformers(ours, tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    assert "auto_map" not in config
    x = torch.randn(2, 3, 168, 308)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = ours(x).last_hidden_state
    result = run_isolated(
        """
        import json, torch, numpy as np
        from PIL import Image
        from transformers import AutoModel, AutoImageProcessor, pipeline
        model = AutoModel.from_pretrained("stock").eval()
        x = torch.load("x.pt")
        with torch.no_grad():
            out = model(x).last_hidden_state
        torch.save(out, "stock_out.pt")
        processor = AutoImageProcessor.from_pretrained("stock")
        image = Image.fromarray((np.random.RandomState(0).rand(300, 400, 3) * 255).astype("uint8"))
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            direct = model(pixels).last_hidden_state
        features = pipeline("image-feature-extraction", model="stock", device="cpu")(image, return_tensors=True)
        print(json.dumps({
            "class": type(model).__name__, "pixels": list(pixels.shape),
            "size": {"shortest_edge": processor.size.shortest_edge},
            "crop": {"height": processor.crop_size.height, "width": processor.crop_size.width}, "resample": int(processor.resample),
            "pipeline_matches": bool(torch.allclose(features, direct, atol=1e-5)),
        }))
        """,
        cwd=tmp_path,
    )
    assert result["class"] == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert result["pixels"] == [1, 3, 224, 224]
    assert result["size"] == {"shortest_edge": 256} and result["crop"] == {"height": 224, "width": 224}
    assert result["resample"] == 3  # bicubic
    assert result["pipeline_matches"]
    torch.testing.assert_close(torch.load(tmp_path / "stock_out.pt"), expected, rtol=0, atol=1e-5)


def test_trust_remote_code_without_package(tiny_kwargs, tmp_path):
    ours = tiny_model(tiny_kwargs, num_register_tokens=2, use_swiglu_ffn=True)
    save_ours(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "dinov2_hf"
    assert saved["auto_map"]["AutoModel"] == "modeling_dinov2_hf.Dinov2HFModel"
    assert saved["auto_map"]["AutoBackbone"] == "modeling_dinov2_hf.Dinov2HFBackbone"
    assert (tmp_path / "ours" / "modeling_dinov2_hf.py").is_file()
    x = torch.randn(1, 3, 98, 126)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = ours(x).last_hidden_state
    result = run_isolated(
        """
        import json, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained("ours", trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load("x.pt")).last_hidden_state, "remote_out.pt")
        print(json.dumps({"class": type(model).__name__, "module": type(model).__module__}))
        """,
        cwd=tmp_path,
    )
    assert result["class"] == "Dinov2HFModel" and "dinov2_hf" not in result["module"].split(".")[0]
    torch.testing.assert_close(torch.load(tmp_path / "remote_out.pt"), expected, rtol=0, atol=0)


def test_in_process_auto_classes(tiny_kwargs, tmp_path):
    from transformers import AutoBackbone, AutoConfig, AutoModel

    from dinov2_hf import Dinov2HFBackbone

    ours = tiny_model(tiny_kwargs)
    ours.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Dinov2HFConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, Dinov2HFModel)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    # AutoBackbone.from_pretrained asks the Hub whether a local folder is a repo (a transformers bug), so
    # registration is checked with from_config and local loading goes through the concrete class.
    assert isinstance(AutoBackbone.from_config(ours.config), Dinov2HFBackbone)
    backbone = Dinov2HFBackbone.from_pretrained(tmp_path, out_features=["stage1", "stage2"])
    assert backbone.out_features == ["stage1", "stage2"]
    assert torch.equal(backbone.layernorm.weight, ours.layernorm.weight)


def test_load_backbone_every_source(tiny_kwargs, tmp_path):
    """load_backbone reads our folders, stock transformers folders and Meta .pth files to the same weights."""
    from test_meta_conversion import meta_state_dict

    from dinov2_hf.modeling import load_backbone
    from dinov2_hf.modeling.convert_meta import from_meta

    model = tiny_model(tiny_kwargs)
    save_ours(model, tmp_path / "ours")
    export_transformers(model, tmp_path / "stock")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = model(x).last_hidden_state
        for folder in ("ours", "stock"):
            loaded, description = load_backbone(tmp_path / folder)
            assert str(tmp_path / folder) in description
            torch.testing.assert_close(loaded(x).last_hidden_state, expected, rtol=0, atol=1e-5)
        torch.save(meta_state_dict(), tmp_path / "meta.pth")
        loaded, description = load_backbone(tmp_path / "meta.pth")
        assert description.endswith("(meta)")
        torch.testing.assert_close(loaded(x).last_hidden_state, from_meta(meta_state_dict())(x).last_hidden_state)
    random_model, description = load_backbone(None, preset="tiny")
    assert description == "random tiny" and not random_model.training
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a Meta checkpoint"):
        load_backbone(tmp_path / "notes.txt")


# -- strict loading and clear CLI errors ----------------------------------------------------------


def stock_model(tiny_kwargs, registers):
    """A stock transformers Dinov2Model (Dinov2WithRegistersModel with registers) with random weights."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if registers:
        return randomize_(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tiny_kwargs, num_register_tokens=registers))).eval()
    return randomize_(Dinov2Model(Dinov2Config(**tiny_kwargs))).eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_export_of_a_stock_folder_is_an_exact_copy(tiny_kwargs, tmp_path, capsys, registers):
    """A folder that is already stock (a run's export/transformers, a copy of facebook/dinov2-small) is re-saved
    through our model: every tensor and output as it was (loaded as ours, all attention would be random)."""
    from transformers import AutoModel

    from dinov2_hf.cli import main

    stock = stock_model(tiny_kwargs, registers)
    stock.save_pretrained(tmp_path / "stock")
    assert main(["export", "--to", "transformers", str(tmp_path / "stock"), str(tmp_path / "out")]) == 0
    assert f"already stock {stock.config.model_type}, re-saved" in capsys.readouterr().out
    exported = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(exported) is type(stock)
    original, copied = stock.state_dict(), exported.state_dict()
    assert original.keys() == copied.keys()
    for key in original:
        assert torch.equal(original[key], copied[key]), key
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        expected, actual = stock(x), exported(x)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, rtol=0, atol=0)


def test_export_keeps_the_source_image_processor(tiny_kwargs, tmp_path):
    from dinov2_hf.cli import main

    save_ours(tiny_model(tiny_kwargs), tmp_path / "ours", crop_size=98)  # e.g. a run's export at its final crop
    assert main(["export", "--to", "transformers", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["crop_size"] == {"height": 98, "width": 98}


def test_a_stock_image_classifier_folder_converts_without_its_head(tiny_kwargs, tmp_path):
    from transformers import Dinov2ForImageClassification

    classifier = randomize_(Dinov2ForImageClassification(Dinov2Config(**tiny_kwargs, num_labels=3))).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    ours = from_transformers(tmp_path / "classifier")  # classifier.* is the one thing dropped on purpose
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).last_hidden_state, classifier.dinov2(x).last_hidden_state, rtol=0, atol=1e-5)


def rewrite_weights(folder, drop=None, add=None):
    """Rewrite ``folder``'s model.safetensors without the tensor ``drop`` and/or with an extra tensor ``add``."""
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    if drop:
        del weights[drop]
    if add:
        weights[add] = torch.zeros(3)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change", [{"drop": "encoder.layer.1.attention.qkv.weight"}, {"add": "encoder.layer.1.extra.weight"}])
def test_our_folder_with_missing_or_extra_weights_is_refused(tiny_kwargs, tmp_path, capsys, change):
    from dinov2_hf.cli import main
    from dinov2_hf.modeling import load_backbone

    save_ours(tiny_model(tiny_kwargs), tmp_path / "ours")
    rewrite_weights(tmp_path / "ours", **change)
    key = change.get("drop") or change.get("add")
    kind = "missing from the checkpoint" if "drop" in change else "in the checkpoint but not in the model"
    with pytest.raises(ValueError, match=rf"do not match the Dinov2HFModel .*{kind}: {re.escape(key)}"):
        load_backbone(tmp_path / "ours")
    for target in ("transformers", "onnx"):
        assert main(["export", "--to", target, str(tmp_path / "ours"), str(tmp_path / target)]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err, err
        assert not (tmp_path / target).exists()


@pytest.mark.parametrize("change", [{"drop": "encoder.layer.0.norm1.weight"}, {"add": "encoder.layer.0.extra.bias"}])
def test_stock_folder_with_missing_or_extra_weights_is_refused(tiny_kwargs, tmp_path, capsys, change):
    from dinov2_hf.cli import main

    stock_model(tiny_kwargs, 0).save_pretrained(tmp_path / "stock")
    rewrite_weights(tmp_path / "stock", **change)
    key = change.get("drop") or change.get("add")
    with pytest.raises(ValueError, match=rf"do not match the Dinov2Model .*{re.escape(key)}"):
        from_transformers(tmp_path / "stock")
    for command in (["export", "--to", "transformers"], ["convert", "--from", "transformers"]):
        assert main([*command, str(tmp_path / "stock"), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_stock_folder_is_not_loaded_as_ours(tiny_kwargs, tmp_path):
    from dinov2_hf.modeling.loading import load_ours

    stock_model(tiny_kwargs, 0).save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match=r"model_type 'dinov2', not 'dinov2_hf': a stock transformers Dinov2 folder"):
        load_ours(tmp_path / "stock")


def test_convert_of_a_file_that_is_not_a_meta_checkpoint_is_a_clear_error(tmp_path, capsys):
    from dinov2_hf.cli import main

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    assert main(["convert", "--from", "meta", str(tmp_path / "tensor.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{tmp_path / 'tensor.pth'} is not a Meta checkpoint: it holds a Tensor; a Meta DINOv2 checkpoint is a dict" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["convert", "--from", "meta"], ["export", "--to", "transformers"], ["export", "--to", "onnx"]])
def test_an_output_under_a_file_fails_before_loading(tiny_kwargs, tmp_path, capsys, monkeypatch, command):
    from dinov2_hf.cli import main
    from dinov2_hf.modeling import convert_meta, loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the output path was checked")

    monkeypatch.setattr(convert_meta, "from_meta", no_loading)
    monkeypatch.setattr(loading, "load_backbone", no_loading)
    if command[0] == "convert":
        from test_meta_conversion import meta_state_dict

        source = tmp_path / "meta.pth"
        torch.save(meta_state_dict(), source)
    else:
        source = tmp_path / "ours"
        save_ours(tiny_model(tiny_kwargs), source)
    (tmp_path / "notes.txt").write_text("x")
    for output, message in [
        (tmp_path / "notes.txt" / "out", f"output folder {tmp_path / 'notes.txt' / 'out'} is under {tmp_path / 'notes.txt'}, which is a file"),
        (tmp_path / "notes.txt", f"output folder {tmp_path / 'notes.txt'} is a file"),
    ]:
        assert main([*command, str(source), str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
