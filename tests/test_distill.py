"""Distillation (paper mode): frozen teacher with heads from one of our checkpoints, student with its own
heads, no input masking, iBOT on every global-crop patch, the student's spare EMA exported."""

import pytest
import torch
from safetensors.torch import load_file
from test_objective import fake_batch, tiny_config
from test_trainer import tiny_config as tiny_train_config
from test_trainer import write_cifar_subset

from dinov2_hf.objective import DinoSettings, ModelSettings, SSLMetaArch
from dinov2_hf.objective.distill import DistillMetaArch
from dinov2_hf.training.build import build_arch, load_teacher
from dinov2_hf.training.trainer import Trainer


def student_config(**dino):
    return tiny_config(
        model=ModelSettings(preset="tiny", drop_path_rate=0.0, overrides={"hidden_size": 32, "num_attention_heads": 2}),
        dino=DinoSettings(**{"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, **dino}),
    )


def frozen_teacher():
    torch.manual_seed(1)
    teacher = SSLMetaArch(tiny_config())
    return teacher.teacher.requires_grad_(False), teacher.config


def test_distill_step_uses_the_frozen_teacher_unmasked_inputs_and_all_patches(monkeypatch):
    teacher, teacher_config = frozen_teacher()
    arch = DistillMetaArch(student_config(), teacher, teacher_config).train()
    assert arch.exported_backbone is arch.student_ema["backbone"] and not arch.student_ema.training
    batch = fake_batch(arch.config)
    assert not batch["masks"].all()  # the collator's random iBOT masks ...
    seen = {}
    forward_packed = arch.student["backbone"].forward_packed

    def capture_inputs(crops, masks):
        seen["masks"] = masks
        return forward_packed(crops, masks)

    monkeypatch.setattr(arch.student["backbone"], "forward_packed", capture_inputs)
    forward_masked = arch.ibot_patch_loss.forward_masked

    def capture(*args, **kwargs):
        seen["ibot_masks"] = kwargs["student_masks_flat"]
        return forward_masked(*args, **kwargs)

    monkeypatch.setattr(arch.ibot_patch_loss, "forward_masked", capture)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = arch(batch, teacher_temp=0.07)
    out["loss"].backward()
    assert seen["masks"] == [None, None]  # ... never reach the student's inputs
    assert seen["ibot_masks"].all()  # and iBOT covers every patch of the global crops
    assert all(p.grad is None for p in teacher.parameters())
    student = {k: v.detach().clone() for k, v in arch.student.state_dict().items()}
    ema = {k: v.clone() for k, v in arch.student_ema.state_dict().items()}
    arch.update_teacher(0.9)
    for name, value in arch.student_ema.state_dict().items():  # the spare EMA moves, exactly
        torch.testing.assert_close(value, 0.9 * ema[name] + 0.1 * student[name], rtol=0, atol=1e-6)
    for name, value in teacher.state_dict().items():  # the teacher does not
        assert torch.equal(value, teacher_before[name]), name


def test_student_heads_and_patches_must_match_the_teacher():
    teacher, teacher_config = frozen_teacher()
    with pytest.raises(ValueError, match="head_n_prototypes=32 but the teacher has 64"):
        DistillMetaArch(student_config(head_n_prototypes=32), teacher, teacher_config)
    config = student_config()
    config.model.overrides["patch_size"] = 7
    with pytest.raises(ValueError, match="patch size 7 != teacher's 14"):
        DistillMetaArch(config, teacher, teacher_config)


def test_distill_from_a_training_checkpoint_exports_the_student_ema(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    Trainer(tiny_train_config(data, tmp_path / "teacher", max_steps=3)).train()
    checkpoint = tmp_path / "teacher" / "checkpoints" / "checkpoint-3"
    teacher, _ = load_teacher(checkpoint)
    saved = load_file(checkpoint / "model.safetensors")
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, saved[f"teacher.{name}"]), name
    student = ["model.overrides.hidden_size=32", "model.overrides.num_attention_heads=2", f"distill.teacher={checkpoint}"]
    trainer = Trainer(tiny_train_config(data, tmp_path / "student", student, max_steps=3))
    arch = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(arch, DistillMetaArch) and arch.teacher["backbone"].config.hidden_size == 48
    # Loading the teacher draws nothing from the global RNG: the student starts where the same student
    # trained from scratch starts, in both modes.
    scratch_config = tiny_train_config(data, tmp_path / "scratch", student[:-1], max_steps=3)
    export = tmp_path / "teacher" / "export" / "transformers"
    for teacher_source in (checkpoint, export):
        torch.manual_seed(0)
        scratch = build_arch(scratch_config).student["backbone"].state_dict()
        torch.manual_seed(0)
        distilled = build_arch(tiny_train_config(data, tmp_path / "d", [*student[:-1], f"distill.teacher={teacher_source}"]))
        assert type(distilled).__name__ == ("DistillMetaArch" if teacher_source == checkpoint else "FeatureDistillMetaArch")
        for name, value in distilled.student["backbone"].state_dict().items():
            assert torch.equal(value, scratch[name]), name
    history = trainer.train().history
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(tmp_path / "student" / "export" / "transformers")
    assert exported.config.hidden_size == 32
    ema = arch.student_ema["backbone"].state_dict()
    student_weights = arch.student["backbone"].state_dict()
    layer = "encoder.layer.0.layer_scale1.lambda1"
    torch.testing.assert_close(exported.state_dict()[layer], ema[layer])
    assert not torch.equal(ema[layer], student_weights[layer])
    with pytest.raises(FileNotFoundError, match="not a training checkpoint of ours"):
        load_teacher(tmp_path / "student" / "export" / "transformers")
    # A distilled checkpoint teaches on (g -> L -> S): its teacher is the student's EMA, heads included.
    chained, chained_config = load_teacher(tmp_path / "student" / "checkpoints" / "checkpoint-3")
    assert chained["backbone"].config.hidden_size == 32 and chained_config.distill.teacher == str(checkpoint)
    for name, value in arch.student_ema.state_dict().items():
        assert torch.equal(chained.state_dict()[name], value), name


def test_distill_recipes_match_their_teachers_and_the_cli_fails_clearly(tmp_path, capsys):
    from dinov2_hf.cli import main
    from dinov2_hf.training.config import load_train_config

    recipes = {"distill_cifar10": "cifar10", "distill_quickstart": "quickstart", "distill_vitg14_to_vits14": "vitg14",
               "distill_vitg14_to_vitb14": "vitg14", "distill_vitg14_to_vitl14": "vitg14"}
    for student, teacher in recipes.items():
        s, t = load_train_config(student), load_train_config(teacher)
        assert (s.dino.head_n_prototypes, s.ibot.separate_head, s.ibot.head_n_prototypes) == (
            t.dino.head_n_prototypes, t.ibot.separate_head, t.ibot.head_n_prototypes)
        assert s.model.drop_path_rate == 0.0 and s.distill.teacher == ""
        assert s.model.overrides.get("patch_size", 14) == t.model.overrides.get("patch_size", 14)
        if student.startswith("distill_vitg14_to_"):  # the released students' architecture: MLP blocks, not SwiGLU
            assert s.model.preset == student[-6:] and not s.model.overrides.get("use_swiglu_ffn", False)
    assert main(["distill", "--teacher", str(tmp_path / "nope"), "train.mixed_precision=no"]) == 2
    assert "nope does not exist" in capsys.readouterr().err


def test_feature_distillation_learns_the_teacher_features_on_another_grid():
    """Headless mode: a stock transformers teacher (patch 14), a student on a finer grid (patch 7)."""
    from transformers import Dinov2Config, Dinov2Model

    from dinov2_hf.objective import param_groups
    from dinov2_hf.objective.distill import FeatureDistillMetaArch

    torch.manual_seed(0)
    stock = Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                                     image_size=56, patch_size=14)).eval()
    from dinov2_hf.modeling.convert_transformers import from_transformers

    teacher = from_transformers(stock)
    config = student_config()
    config.model.overrides["patch_size"] = 7
    arch = FeatureDistillMetaArch(config, teacher).train()
    assert arch.exported_backbone is arch.student_ema["backbone"]
    optimizer = torch.optim.AdamW(param_groups(arch.student), lr=3e-3)
    batch = fake_batch(arch.config, images=8)
    losses = []
    for _ in range(30):
        out = arch(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        arch.update_teacher(0.5)
        losses.append(float(out["loss"]))
    assert all(p.grad is None for p in arch.teacher.parameters())
    assert losses[-1] < 0.5 * losses[0], losses  # the projections and the student fit the teacher's tokens
    assert 0 < float(out["distill_patch_loss"]) < float(out["loss"])
    with pytest.raises(ValueError, match="distill.loss='l2'"):
        FeatureDistillMetaArch(config, teacher, loss="l2")


def test_feature_distillation_from_a_stock_transformers_folder(cifar_dir, tmp_path):
    """`distill.teacher=<stock transformers folder>` picks the headless mode and exports the student EMA."""
    from transformers import AutoModel

    from dinov2_hf.objective.distill import FeatureDistillMetaArch

    data = write_cifar_subset(cifar_dir, tmp_path / "data")
    Trainer(tiny_train_config(data, tmp_path / "teacher", max_steps=2)).train()
    stock = tmp_path / "teacher" / "export" / "transformers"
    student = ["model.overrides.hidden_size=32", "model.overrides.num_attention_heads=2", f"distill.teacher={stock}",
               "distill.loss=smooth_l1"]
    trainer = Trainer(tiny_train_config(data, tmp_path / "student", student, max_steps=3))
    assert isinstance(trainer.accelerator.unwrap_model(trainer.model), FeatureDistillMetaArch)
    history = trainer.train().history
    assert len(history) == 3 and all("distill_patch_loss" in r for r in history)
    assert AutoModel.from_pretrained(tmp_path / "student" / "export" / "transformers").config.hidden_size == 32
    with pytest.raises(ValueError, match="headless distillation checkpoint"):
        load_teacher(tmp_path / "student" / "checkpoints" / "checkpoint-3")


def test_standardize_is_per_channel_and_feature_targets_ignore_what_all_images_share():
    from transformers import Dinov2Config, Dinov2Model

    from dinov2_hf.modeling.convert_transformers import from_transformers
    from dinov2_hf.objective.distill import FeatureDistillMetaArch, standardize

    features = torch.tensor([[1.0, 10.0], [3.0, 10.5], [5.0, 11.0]])
    # channel 0: mean 3, sample std 2; channel 1: mean 10.5, sample std 0.5
    torch.testing.assert_close(standardize(features, dims=(0,)), torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]), atol=1e-5, rtol=0)
    patches = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 7
    standardized = standardize(patches, dims=(0, 2, 3))
    torch.testing.assert_close(standardized.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardized.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)

    # A vector added to every teacher token (the final LayerNorm's bias) changes nothing once standardised.
    torch.manual_seed(0)
    stock = Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                                     image_size=56, patch_size=14)).eval()
    teacher = from_transformers(stock)
    config = student_config()
    batch = fake_batch(config, images=4)
    losses = {}
    for standardize_targets in (True, False):
        torch.manual_seed(1)
        arch = FeatureDistillMetaArch(config, teacher, standardize_targets=standardize_targets)
        before = float(arch(batch)["loss"])
        with torch.no_grad():
            teacher.layernorm.bias.add_(3.0)
            after = float(arch(batch)["loss"])
            teacher.layernorm.bias.sub_(3.0)
        losses[standardize_targets] = (before, after)
    assert losses[True][0] == pytest.approx(losses[True][1], abs=1e-5)
    assert abs(losses[False][0] - losses[False][1]) > 0.05, losses  # the raw targets move with the shared vector


def test_a_bf16_teacher_gives_the_fp32_teachers_targets_within_bf16_rounding():
    """distill.teacher_dtype: the frozen teacher stored in bfloat16 (half the memory) runs under autocast
    from fp32 crops on a CPU too; its logits reach the centering in fp32, the student stays fp32."""
    from transformers import Dinov2Config, Dinov2Model

    from dinov2_hf.modeling.convert_transformers import from_transformers
    from dinov2_hf.objective.distill import FeatureDistillMetaArch

    batch = fake_batch(student_config())
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        teacher, teacher_config = frozen_teacher()
        torch.manual_seed(0)
        arch = DistillMetaArch(student_config(), teacher, teacher_config, teacher_dtype=dtype).train()
        assert {p.dtype for p in arch.teacher.parameters()} == {dtype}
        assert {p.dtype for p in arch.student.parameters()} == {p.dtype for p in arch.student_ema.parameters()} == {torch.float32}
        logits[dtype] = arch.teacher_logits(batch)
        out = arch(batch, teacher_temp=0.07)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and all(p.grad.dtype == torch.float32 for p in arch.student.parameters() if p.grad is not None)
    for full, half in zip(logits[torch.float32], logits[torch.bfloat16]):
        assert half.dtype == torch.float32
        assert not torch.equal(full, half)  # really computed in bf16 ...
        torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)  # ... to bf16's precision

    torch.manual_seed(0)
    stock = Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                                     image_size=56, patch_size=14)).eval()
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        arch = FeatureDistillMetaArch(student_config(), from_transformers(stock), teacher_dtype=dtype)
        assert {p.dtype for p in arch.teacher.parameters()} == {dtype}
        losses.append(float(arch(batch)["loss"]))
    assert losses[0] != losses[1] and losses[1] == pytest.approx(losses[0], rel=0.02)


def test_teacher_dtype_auto_follows_mixed_precision_but_not_fsdp(monkeypatch, tmp_path):
    from dinov2_hf.training.build import teacher_dtype
    from dinov2_hf.training.config import load_train_config

    def resolved(**settings):
        overrides = [f"train.mixed_precision={settings.get('precision', 'no')}", f"distill.teacher_dtype={settings.get('dtype', 'auto')}"]
        return teacher_dtype(load_train_config("distill_cifar10", overrides))

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert resolved(precision="bf16") == torch.bfloat16
    assert resolved(precision="no") == resolved(precision="fp16") == torch.float32
    assert resolved(precision="no", dtype="bfloat16") == torch.bfloat16
    assert resolved(precision="bf16", dtype="float32") == torch.float32
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolved(precision="bf16") == torch.float32  # sharded with the student: one dtype
    with pytest.raises(ValueError, match="teacher_dtype=bfloat16 under FSDP"):
        resolved(dtype="bfloat16")
    with pytest.raises(ValueError, match="teacher_dtype"):
        resolved(dtype="float16")


@pytest.mark.parametrize("mode", ["heads", "features", "features_cls_only", "self_distillation_without_ibot"])
def test_every_trainable_student_parameter_gets_a_gradient(mode):
    """DDP stops when a trainable parameter gets no gradient: the unused mask token (inputs are never
    masked: distillation, or ibot.loss_weight=0) and, with distill.patch_weight=0, the patch projection
    must be frozen."""
    from transformers import Dinov2Config, Dinov2Model

    from dinov2_hf.modeling.convert_transformers import from_transformers
    from dinov2_hf.objective.distill import FeatureDistillMetaArch

    if mode == "self_distillation_without_ibot":
        config = tiny_config()
        config.ibot.loss_weight = 0.0
        arch = SSLMetaArch(config).train()
        loss = arch(fake_batch(config), teacher_temp=0.07)["loss"]
    elif mode == "heads":
        teacher, teacher_config = frozen_teacher()
        arch = DistillMetaArch(student_config(), teacher, teacher_config).train()
        loss = arch(fake_batch(arch.config), teacher_temp=0.07)["loss"]
    else:
        stock = Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96, image_size=56, patch_size=14))
        arch = FeatureDistillMetaArch(student_config(), from_transformers(stock), patch_weight=0.0 if mode == "features_cls_only" else 1.0)
        loss = arch(fake_batch(arch.config))["loss"]
    loss.backward()
    missing = [name for name, p in arch.student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert not arch.student["backbone"].embeddings.mask_token.requires_grad


def test_distill_quickstart_follows_the_quickstart(tmp_path, capsys):
    """README: `dinov2-hf distill --config distill_quickstart --teacher <quickstart checkpoint>` (2 steps each)."""
    from dinov2_hf.cli import main

    short = ["train.max_steps=2", "train.save_every=2", "monitor.every=0", "crops.local_crops_number=2", "train.batch_size_per_device=16"]
    assert main(["train", "--config", "quickstart", *short, f"train.output_dir={tmp_path / 'quickstart'}"]) == 0
    teacher = tmp_path / "quickstart" / "checkpoints" / "checkpoint-2"
    assert main(["distill", "--config", "distill_quickstart", "--teacher", str(teacher), *short, f"train.output_dir={tmp_path / 'student'}"]) == 0
    assert "step 2: loss" in capsys.readouterr().out
    from transformers import AutoModel

    student = AutoModel.from_pretrained(tmp_path / "student" / "export" / "transformers")
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (64, 2)
