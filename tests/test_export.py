"""Round trips and exports: ours <-> transformers, stock loading, trust_remote_code, processor, pipeline."""

import json
import os
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
