"""Continued pretraining from a released backbone (``model.init_from``): student and teacher start from the source,
its architecture is the model's (a contradicting recipe field is refused before any work), a published folder's heads
load, fresh heads train alone for ``train.freeze_backbone_steps``, resume and export work as in any run."""

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file
from test_meta_conversion import meta_state_dict
from test_trainer import tiny_config, write_cifar_subset
from transformers import Dinov2Config, Dinov2Model

from dinov2_hf.modeling.configuration_dinov2_hf import config_fields
from dinov2_hf.training import init_from
from dinov2_hf.training.config import load_train_config
from dinov2_hf.training.init_from import resolve_init
from dinov2_hf.training.trainer import Trainer

# tiny_config's architecture (cifar10 recipe: patch 4; width 48, 2 blocks, 2 heads) at a 64 px native size: the
# 32 px crops need the position embeddings resized from 16 x 16 to 8 x 8.
SOURCE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=64, layerscale_value=0.5)


def legacy_stock_folder(folder, **overrides):
    """A stock transformers Dinov2 folder laid out as facebook/dinov2-* ship it: the legacy on-disk key names
    (attention.attention.query, attention.output.dense, ...), which transformers renames when it loads them."""
    reference = randomize_(Dinov2Model(Dinov2Config(**{**SOURCE, **overrides})), std=0.05).eval()
    reference.config.save_pretrained(folder)
    legacy = {}
    for key, value in reference.state_dict().items():
        for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense")):
            key = key.replace(new, old)
        legacy[key] = value.contiguous()
    assert any("attention.attention.query" in key for key in legacy)
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    return reference


@pytest.fixture
def data(cifar_dir, tmp_path):
    return write_cifar_subset(cifar_dir, tmp_path / "data", rows=96)


def backbone_state(trainer, part):
    arch = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in getattr(arch, part)["backbone"].state_dict().items()}


def test_every_config_field_is_classified():
    """A new Dinov2HFConfig field must say whether it comes from the source or from the recipe."""
    listed = init_from.ARCHITECTURE_FIELDS + init_from.TRAINING_FIELDS + init_from.INIT_ONLY_FIELDS
    assert sorted(listed) == config_fields()


def test_init_from_a_legacy_stock_folder_starts_student_and_teacher_at_the_source(data, tmp_path):
    source = tmp_path / "stock"
    reference = legacy_stock_folder(source)
    trainer = Trainer(tiny_config(data, tmp_path / "run", (f"model.init_from={source}",), max_steps=8))
    config = trainer.config.model
    assert config.overrides["hidden_size"] == 48 and config.overrides["num_register_tokens"] == 0
    assert trainer.freeze_steps == 1  # auto: fresh heads train alone for 10% of the run
    arch = trainer.accelerator.unwrap_model(trainer.model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x).last_hidden_state  # transformers resizes its 16 x 16 positions to 8 x 8 on the fly
        for part in (arch.student, arch.teacher):
            backbone = part["backbone"]
            assert backbone.config.image_size == 32 and backbone.embeddings.position_embeddings.shape[1] == 65
            was_training = backbone.training
            torch.testing.assert_close(backbone.eval()(x).last_hidden_state, expected, rtol=0, atol=1e-5)
            backbone.train(was_training)


def test_heads_train_alone_for_freeze_backbone_steps_then_the_backbone_moves_and_resume_is_exact(data, tmp_path):
    source = tmp_path / "stock"
    legacy_stock_folder(source)
    extra = (f"model.init_from={source}", "train.freeze_backbone_steps=2")
    full = Trainer(tiny_config(data, tmp_path / "full", extra, max_steps=4)).train()

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(data, run, extra, max_steps=4, stop_at_step=2))
    start = {part: backbone_state(trainer, part) for part in ("student", "teacher")}
    heads = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).student["dino_head"].state_dict().items()}
    first = trainer.train()
    assert first.steps == 2 and all(r["grad_norm_backbone"] == 0.0 for r in first.history)
    for part in ("student", "teacher"):  # bit-identical to the source after the frozen steps
        after = backbone_state(trainer, part)
        assert all(torch.equal(after[k], start[part][k]) for k in after), part
    moved = trainer.accelerator.unwrap_model(trainer.model).student["dino_head"].state_dict()
    assert any(not torch.equal(moved[k], heads[k]) for k in heads)  # the heads did train

    resumed = Trainer(tiny_config(data, run, extra, max_steps=4))
    second = resumed.train()  # resumes from checkpoint-2: the source is not loaded over it
    assert second.resumed_from == run / "checkpoints" / "checkpoint-2"
    assert [r["step"] for r in second.history] == [2, 3] and second.history[0]["grad_norm_backbone"] > 0
    for part in ("student", "teacher"):
        after = backbone_state(resumed, part)
        assert any(not torch.equal(after[k], start[part][k]) for k in after), part
    # ... on the uninterrupted run's trajectory
    assert [r["loss"] for r in first.history + second.history] == pytest.approx([r["loss"] for r in full.history], abs=1e-5)

    # The export of an init_from run loads in stock transformers and is the teacher.
    from transformers import AutoModel

    stock = AutoModel.from_pretrained(run / "export" / "transformers").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher = resumed.accelerator.unwrap_model(resumed.model).teacher["backbone"].eval()
        torch.testing.assert_close(stock(x).last_hidden_state, teacher(x).last_hidden_state, rtol=0, atol=1e-5)


def test_a_contradicting_recipe_field_is_refused_before_any_work(data, tmp_path, monkeypatch, capsys):
    source = tmp_path / "stock"
    legacy_stock_folder(source)
    from dinov2_hf.training import trainer as trainer_module

    def never(*args, **kwargs):
        raise AssertionError("built something before the check")

    monkeypatch.setattr(trainer_module, "Batches", never)
    monkeypatch.setattr(trainer_module, "build_arch", never)
    config = tiny_config(data, tmp_path / "run", (f"model.init_from={source}", "model.overrides.hidden_size=64"))
    with pytest.raises(ValueError, match=r"model.overrides.hidden_size=64 sets hidden_size 64, the source has 48"):
        Trainer(config)
    # A preset's dimensions count as well; registers the recipe leaves unset come from the source.
    config = load_train_config("cifar10_cpu", [f"model.init_from={source}"])
    with pytest.raises(ValueError, match=r"model.overrides.hidden_size=96 sets hidden_size 96, the source has 48"):
        resolve_init(config)
    config = load_train_config("vits14_single_gpu", [f"model.init_from={source}"])
    with pytest.raises(ValueError, match=r"model.preset=vits14 sets hidden_size 384, the source has 48"):
        resolve_init(config)


def test_cli_errors_for_a_missing_source_a_non_backbone_and_another_architecture(data, tmp_path, capsys):
    from dinov2_hf.cli import main

    source = tmp_path / "stock"
    legacy_stock_folder(source)
    text = tmp_path / "notes.txt"
    text.write_text("not a backbone")
    base = [f"data.source={data}", "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"]
    cases = [
        ([f"model.init_from={tmp_path / 'missing'}"], "model.init_from=" + str(tmp_path / "missing") + " does not exist"),
        ([f"model.init_from={text}"], "is a file but not a Meta checkpoint"),
        ([f"model.init_from={source}"], "model.overrides.hidden_size=96 sets hidden_size 96, the source has 48"),
        ([f"model.init_from={source}", "distill.teacher=x"], "drop one of the two"),
        ([f"model.init_from={source}", "train.freeze_backbone_steps=-2"], "must be -1 (auto)"),
    ]
    for overrides, message in cases:
        assert main(["train", "--config", "cifar10_cpu", *base, *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert not (tmp_path / "run").exists()


def test_a_published_folder_loads_its_heads_exactly_and_other_heads_are_refused(data, tmp_path):
    from dinov2_hf.hub import stage_upload

    Trainer(tiny_config(data, tmp_path / "pretrained", max_steps=2)).train()
    published = stage_upload(tmp_path / "pretrained", tmp_path / "staged", fmt="both")
    folder = tmp_path / "staged" / "dinov2_hf"
    assert published and (folder / "heads.safetensors").is_file()
    trainer = Trainer(tiny_config(data, tmp_path / "run", (f"model.init_from={folder}",), max_steps=2))
    assert trainer.freeze_steps == 0  # auto: the heads are trained already
    arch = trainer.accelerator.unwrap_model(trainer.model)
    heads, backbone = load_file(folder / "heads.safetensors"), load_file(folder / "model.safetensors")
    for part in (arch.student, arch.teacher):
        state = part.state_dict()
        assert all(torch.equal(state[k], v) for k, v in heads.items())
        assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in backbone.items())  # same crop: no resize
    assert len(trainer.train().history) == 2

    with pytest.raises(ValueError, match=r"dino.head_n_prototypes: 128 -> 64"):
        resolve_init(tiny_config(data, tmp_path / "other", (f"model.init_from={folder}", "dino.head_n_prototypes=64")))
    # Its backbone alone (the stock root of the pushed repo) starts fresh heads of any shape.
    config, init = resolve_init(tiny_config(data, tmp_path / "other", (f"model.init_from={tmp_path / 'staged'}",
                                                                       "dino.head_n_prototypes=64")))
    assert init.heads_file is None and config.train.freeze_backbone_steps == 1


def test_a_meta_pth_gives_its_architecture_from_its_weights(data, tmp_path):
    torch.save(meta_state_dict(dim=64, depth=2, patch=4, grid=16), tmp_path / "backbone.pth")
    extra = (f"model.init_from={tmp_path / 'backbone.pth'}", "model.overrides.hidden_size=64",
             "model.overrides.num_attention_heads=1")
    config, init = resolve_init(tiny_config(data, tmp_path / "run", extra))
    assert init.loaded is not None and config.model.overrides["pos_embed_interpolation"] == "meta"
    assert resolve_init(config)[0] == config  # a resolved recipe (as checkpoints carry it) resolves to itself
    with pytest.raises(ValueError, match="num_attention_heads 2, the source has 1"):
        resolve_init(tiny_config(data, tmp_path / "run", extra[:2]))


def test_adapt_recipes():
    for name, preset in (("adapt_vits14", "vits14"), ("adapt_vitb14", "vitb14"), ("adapt_vitl14", "vitl14")):
        config = load_train_config(name)
        assert config.model.preset == preset and not config.model.overrides and config.model.init_from == ""
        assert config.schedule.base_lr <= 2e-4 and 0.994 <= config.schedule.momentum_teacher <= 0.999
        assert config.train.freeze_backbone_steps == -1
    cpu, scratch = load_train_config("adapt_cpu"), load_train_config("cifar10_cpu")
    assert cpu.model.overrides == scratch.model.overrides and cpu.dino == scratch.dino  # continues a cifar10_cpu run
    assert cpu.schedule.momentum_teacher > scratch.schedule.momentum_teacher  # the teacher stays near the source


def test_the_adapt_cpu_recipe_runs_from_a_cifar10_cpu_shaped_stock_backbone(data, tmp_path, capsys, monkeypatch):
    """The README's example, shortened: adapt_cpu from a stock folder with cifar10_cpu's architecture."""
    from dinov2_hf.cli import main

    monkeypatch.chdir(tmp_path)
    legacy_stock_folder(tmp_path / "stand-in", hidden_size=96, num_hidden_layers=4, num_attention_heads=3, image_size=32)
    assert main(["train", "--config", "adapt_cpu", "model.init_from=stand-in", f"data.source={data}", "train.max_steps=2",
                 "train.batch_size_per_device=16", "train.num_workers=0", "train.output_dir=outputs/adapt"]) == 0
    printed = capsys.readouterr().out
    assert "2 steps -> outputs/adapt" in printed and "exported to outputs/adapt/export" in printed
    card = (tmp_path / "outputs" / "adapt" / "export" / "transformers" / "README.md").read_text()
    assert "continued from `stand-in`" in card
    saved = load_train_config(tmp_path / "outputs" / "adapt" / "checkpoints" / "checkpoint-2" / "train_config.yaml")
    assert saved.train.freeze_backbone_steps == 1 and saved.model.overrides["hidden_size"] == 96
