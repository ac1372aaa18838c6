"""Masking, schedules, parameter groups, heads, EMA and the meta-architecture."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2_hf.data.collate import MultiCropCollator
from dinov2_hf.data.masking import MaskingGenerator, stratified_masks
from dinov2_hf.data.transforms import MultiCropSettings
from dinov2_hf.objective import (
    DINOHead,
    DinoSettings,
    IbotSettings,
    ModelSettings,
    ScheduleSettings,
    SSLConfig,
    SSLMetaArch,
    apply_schedules,
    build_schedules,
    param_groups,
)

# -- masking ------------------------------------------------------------------------------------------


def test_stratified_mask_ratios_follow_their_bins():
    rng = random.Random(0)
    generator = MaskingGenerator((16, 16), max_num_patches=128, rng=rng)
    ratios_by_rank = [[] for _ in range(32)]
    for _ in range(100):
        masks, upperbound = stratified_masks(64, generator, (0.1, 0.5), 0.5, rng)
        counts = masks.sum(1)
        assert (counts > 0).sum() <= 32 and (counts == 0).sum() >= 32  # half of the images are masked
        assert counts.sum() <= upperbound
        for rank, count in enumerate(sorted(counts[counts > 0] / 256)):
            ratios_by_rank[rank].append(count)
    edges = np.linspace(0.1, 0.5, 33)
    for rank, ratios in enumerate(ratios_by_rank[:-1]):
        # the k-th smallest ratio lies in (about) the k-th bin: blocks may undershoot a target a little
        assert edges[rank] - 0.03 <= np.median(ratios) <= edges[rank + 1] + 0.01, (rank, np.median(ratios))


def test_masks_reach_their_target_and_never_exceed_it():
    generator = MaskingGenerator((16, 16), max_num_patches=128, rng=random.Random(1))
    fill = []
    for target in range(10, 128, 7):
        count = generator(target).sum()
        assert count <= target
        fill.append(count / target)
    assert np.mean(fill) > 0.95


def test_block_shapes_follow_log_uniform_aspect_and_area():
    generator = MaskingGenerator((32, 32), max_num_patches=512, rng=random.Random(2))
    log_aspects, areas = [], []
    for _ in range(2000):
        mask = np.zeros((32, 32), dtype=bool)
        generator._add_block(mask, 60)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # one rectangle
        log_aspects.append(math.log(h / w))
        areas.append(h * w)
    log_aspects, areas = np.array(log_aspects), np.array(areas)
    bound = math.log(1 / 0.3)
    # Rounding to whole patches stretches small blocks; larger ones stay within the stated range.
    assert np.all(np.abs(log_aspects[areas >= 20]) <= bound + 0.25)
    assert np.mean(np.abs(log_aspects) > bound + 0.25) < 0.03
    assert abs(np.mean(log_aspects)) < 0.05  # symmetric around square
    # log-uniform on [-1.2, 1.2]: standard deviation 2.4 / sqrt(12) = 0.69 before rounding
    assert 0.55 < np.std(log_aspects) < 0.8
    assert 4 <= np.percentile(areas, 1) and np.percentile(areas, 99) <= 66
    assert 28 < np.mean(areas) < 36  # uniform in [4, 60]: mean 32


def test_collate_layout_and_weights():
    collate = MultiCropCollator(global_crops_size=56, patch_size=14, seed=0)
    samples = [{"global_crops": [torch.full((3, 56, 56), 10 * i + c, dtype=torch.uint8) for c in range(2)],
                "local_crops": [torch.full((3, 28, 28), 10 * i + 5 + c, dtype=torch.uint8) for c in range(3)]} for i in range(4)]
    batch = collate(samples)
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]  # crop-major
    assert batch["local_crops"].shape == (12, 3, 28, 28) and batch["local_crops"][4, 0, 0, 0] == 6
    masks = batch["masks"]
    assert masks.shape == (8, 16) and masks.dtype == torch.bool
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    per_image = masks.sum(1).clamp(min=1)
    expected = (1 / per_image).repeat_interleave(masks.sum(1))
    torch.testing.assert_close(batch["masks_weight"], expected)
    assert batch["n_masked_patches"].item() == masks.sum()


def test_collate_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MultiCropCollator(global_crops_size=50, patch_size=14)


# -- schedules and parameter groups ----------------------------------------------------------------------


def test_schedules_hit_their_values():
    config = ScheduleSettings(epochs=10, epoch_length=100, base_lr=0.004, warmup_epochs=2, min_lr=1e-6,
                            warmup_teacher_temp_epochs=3, freeze_last_layer_epochs=1)
    s = build_schedules(config, global_batch_size=256)
    peak = 0.004 * math.sqrt(256 / 1024)
    assert s.lr[0] == 0.0 and s.lr[199] == pytest.approx(peak)  # warmup end
    assert s.lr[200 + 400] == pytest.approx((peak + 1e-6) / 2, rel=1e-6)  # halfway through the cosine
    assert s.lr[999] == pytest.approx(1e-6, rel=1e-2) and s.lr[5000] == 1e-6
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[500] == pytest.approx(0.22)
    assert s.weight_decay[10**6] == 0.4
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[500] == pytest.approx(0.996) and s.momentum[1000] == 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[299] == pytest.approx(0.07)
    assert s.teacher_temp[150] == pytest.approx(0.04 + 0.03 * 150 / 299) and s.teacher_temp[5000] == 0.07
    assert s.last_layer_lr[99] == 0.0 and s.last_layer_lr[100] == s.lr[100] > 0


def tiny_config(**overrides) -> SSLConfig:
    defaults = dict(
        model=ModelSettings(preset="tiny", drop_path_rate=0.0),
        crops=MultiCropSettings(global_crops_size=56, local_crops_size=28, local_crops_number=2),
        dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16),
        ibot=IbotSettings(head_n_prototypes=48, head_hidden_dim=32, head_bottleneck_dim=16),
    )
    defaults.update(overrides)
    return SSLConfig(**defaults)


def test_parameter_groups_lr_and_weight_decay_per_parameter():
    arch = SSLMetaArch(tiny_config())
    groups = param_groups(arch.student, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    optimizer = torch.optim.AdamW(groups)
    apply_schedules(optimizer, lr=1.0, weight_decay=0.1, last_layer_lr=0.5)
    settings = {}
    for group in optimizer.param_groups:
        for name in group["names"]:
            settings[name] = (group["lr"], group["weight_decay"])
    n = 4  # blocks of the tiny preset
    assert settings["backbone.embeddings.patch_embeddings.projection.weight"] == pytest.approx((0.9 ** (n + 1) * 0.2, 0.1))
    assert settings["backbone.embeddings.patch_embeddings.projection.bias"] == pytest.approx((0.9 ** (n + 1) * 0.2, 0.0))
    assert settings["backbone.embeddings.cls_token"] == pytest.approx((0.9 ** (n + 1), 0.1))
    assert settings["backbone.encoder.layer.0.attention.qkv.weight"] == pytest.approx((0.9 ** n, 0.1))
    assert settings["backbone.encoder.layer.3.norm1.weight"] == pytest.approx((0.9, 0.0))
    assert settings["backbone.encoder.layer.3.layer_scale2.lambda1"] == pytest.approx((0.9, 0.0))
    assert settings["backbone.layernorm.weight"] == pytest.approx((1.0, 0.0))
    assert settings["dino_head.mlp.0.weight"] == pytest.approx((1.0, 0.1))
    assert settings["dino_head.last_layer.weight_v"] == pytest.approx((0.5, 0.1))  # prototype layer: its own lr
    assert len(settings) == sum(1 for p in arch.student.parameters())


# -- heads and EMA -------------------------------------------------------------------------------------


def test_dino_head_structure():
    head = DINOHead(24, out_dim=40, hidden_dim=32, bottleneck_dim=8)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 40)
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), head.last_layer.weight_g.squeeze(1))
    # normalised bottleneck + unit rows: logits are cosine similarities
    assert out.abs().max() <= 1.0 + 1e-5
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_ema_update_is_exact():
    arch = SSLMetaArch(tiny_config())
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in arch.teacher.named_parameters()}
    student = dict(arch.student.named_parameters())
    arch.update_teacher(0.9)
    for name, parameter in arch.teacher.named_parameters():
        expected = (before[name] * 0.9).add(student[name], alpha=0.1)  # m * teacher + (1 - m) * student
        assert torch.equal(parameter, expected), name
    assert not any(p.requires_grad for p in arch.teacher.parameters())


# -- meta-architecture ------------------------------------------------------------------------------------


def fake_batch(config: SSLConfig, images: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    crops = config.crops
    samples = [
        {
            "global_crops": [torch.randn(3, crops.global_crops_size, crops.global_crops_size, generator=generator) for _ in range(2)],
            "local_crops": [torch.randn(3, crops.local_crops_size, crops.local_crops_size, generator=generator) for _ in range(crops.local_crops_number)],
        }
        for _ in range(images)
    ]
    return MultiCropCollator(crops.global_crops_size, 14, seed=seed)(samples)


@pytest.mark.parametrize("centering", ["softmax_center", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_head", [False, True])
def test_meta_arch_losses_recompose(centering, separate_head):
    torch.manual_seed(0)
    config = tiny_config(centering=centering, ibot=IbotSettings(separate_head=separate_head, head_n_prototypes=48,
                                                                head_hidden_dim=32, head_bottleneck_dim=16))
    arch = SSLMetaArch(config).train()
    batch = fake_batch(config)
    out = arch(batch, teacher_temp=0.07)
    components = out["dino_local_crops_loss"] + out["dino_global_crops_loss"] + out["koleo_loss"] + out["ibot_loss"]
    torch.testing.assert_close(out["loss"], components)
    out["loss"].backward()
    assert all(p.grad is not None for n, p in arch.student.named_parameters() if "mask_token" not in n)
    assert all(p.grad is None for p in arch.teacher.parameters())
    for key in ("teacher_entropy", "student_entropy", "teacher_batch_entropy", "cls_std", "kl_teacher_student"):
        assert torch.isfinite(out[key])


def test_total_loss_applies_each_weight_once():
    """Weights other than 1: the DINO terms are recorded unweighted and enter the total times dino.loss_weight;
    KoLeo and iBOT are recorded weighted. Same parameters, batch and drop-path draws in both runs."""
    weights = dict(dino_weight=0.5, koleo_weight=0.3, ibot_weight=2.0)

    def run(dino_weight, koleo_weight, ibot_weight):
        config = tiny_config(
            model=ModelSettings(preset="tiny", drop_path_rate=0.2),
            dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16,
                              loss_weight=dino_weight, koleo_loss_weight=koleo_weight),
            ibot=IbotSettings(head_n_prototypes=48, head_hidden_dim=32, head_bottleneck_dim=16, loss_weight=ibot_weight),
        )
        torch.manual_seed(0)
        arch = SSLMetaArch(config).train()  # the same parameters in both runs
        torch.manual_seed(1)
        return arch(fake_batch(config), teacher_temp=0.07)

    unit, weighted = run(1.0, 1.0, 1.0), run(**weights)
    dino_terms = ("dino_local_crops_loss", "dino_global_crops_loss")
    for key in dino_terms:
        torch.testing.assert_close(weighted[key], unit[key])
    torch.testing.assert_close(weighted["koleo_loss"], 0.3 * unit["koleo_loss"])
    torch.testing.assert_close(weighted["ibot_loss"], 2.0 * unit["ibot_loss"])
    expected = 0.5 * sum(unit[k] for k in dino_terms) + 0.3 * unit["koleo_loss"] + 2.0 * unit["ibot_loss"]
    torch.testing.assert_close(weighted["loss"], expected)
    assert not torch.allclose(weighted["loss"], unit["loss"])


def test_health_metrics_on_hand_made_targets():
    """Uniform targets: entropy 1, the flat collapse; every image on one prototype: entropies 0, the one-hot
    collapse; each image on its own prototype: per-image entropy 0, batch entropy log(B)/log(K). Zero student
    logits: student entropy 1 and KL = log K - H(teacher). Orthonormal CLS: cls_std 1; identical CLS: 0."""
    arch = SSLMetaArch(tiny_config())
    images, k = 4, 16  # 2 global crops x 4 images = 8 rows
    zeros, log_k = torch.zeros(2 * images, k), math.log(k)
    orthonormal, identical = torch.eye(8, 8), torch.ones(8, 8)

    uniform = arch.health_metrics(zeros, torch.full((2, images, k), 1 / k), orthonormal)
    assert uniform["teacher_entropy"].item() == pytest.approx(1.0)
    assert uniform["teacher_batch_entropy"].item() == pytest.approx(1.0)
    assert uniform["student_entropy"].item() == pytest.approx(1.0)
    assert uniform["kl_teacher_student"].item() == pytest.approx(0.0, abs=1e-6)
    assert uniform["cls_std"].item() == pytest.approx(1.0)
    assert uniform["collapse"].item() == 1.0  # flat

    one_hot = torch.zeros(2, images, k)
    one_hot[..., 0] = 1
    same = arch.health_metrics(zeros, one_hot, orthonormal)
    assert same["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["teacher_batch_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["kl_teacher_student"].item() == pytest.approx(log_k)
    assert same["collapse"].item() == 1.0  # one prototype

    own = torch.zeros(2, images, k)
    for crop in range(2):
        own[crop, torch.arange(images), torch.arange(images) * 2 + crop] = 1  # 8 distinct prototypes
    spread = arch.health_metrics(zeros, own, orthonormal)
    assert spread["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert spread["teacher_batch_entropy"].item() == pytest.approx(math.log(8) / log_k)
    assert spread["collapse"].item() == 0.0

    flat_features = arch.health_metrics(zeros, own, identical)
    assert flat_features["cls_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert flat_features["collapse"].item() == 1.0


def test_dino_global_term_pairs_crop1_with_teacher_crop2():
    """The global DINO term equals the two cross pairs computed by hand from the teacher's targets."""
    torch.manual_seed(0)
    config = tiny_config(dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, koleo_loss_weight=0.0),
                         ibot=IbotSettings(loss_weight=0.0))
    arch = SSLMetaArch(config).eval()
    with torch.no_grad():  # make the teacher different from the student
        for p in arch.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = fake_batch(config, images=3)
    out = arch(batch, teacher_temp=0.07)
    arch_targets = DINOTargets(arch, batch)
    student_cls = arch.student["backbone"](batch["global_crops"]).pooler_output
    student_logits = arch.student["dino_head"](student_cls)
    s1, s2 = student_logits.chunk(2)
    t1, t2 = arch_targets  # teacher targets of crop 1 and crop 2
    ce = lambda s, t: -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()  # noqa: E731
    expected = (ce(s1, t2) + ce(s2, t1)) / (2 + 2 * 2)
    torch.testing.assert_close(out["dino_global_crops_loss"], expected, rtol=1e-5, atol=1e-6)


def DINOTargets(arch, batch):
    """Softmax-centred teacher targets per crop, recomputed independently (center is still zero at step 1)."""
    with torch.no_grad():
        cls = arch.teacher["backbone"](batch["global_crops"]).pooler_output
        logits = arch.teacher["dino_head"](cls)
        return F.softmax(logits / 0.07, dim=-1).chunk(2)


def test_meta_arch_without_local_crops_and_with_registers():
    config = tiny_config(crops=MultiCropSettings(global_crops_size=56, local_crops_size=28, local_crops_number=0),
                         model=ModelSettings(preset="tiny", drop_path_rate=0.2, overrides={"num_register_tokens": 2}))
    arch = SSLMetaArch(config).train()
    out = arch(fake_batch(config), teacher_temp=0.04)
    assert "dino_local_crops_loss" not in out and torch.isfinite(out["loss"])
    assert arch.student["backbone"].config.num_register_tokens == 2
    assert all(layer.drop_path_rate == 0.0 for layer in arch.teacher["backbone"].encoder.layer)
    assert all(layer.drop_path_rate == 0.2 for layer in arch.student["backbone"].encoder.layer)


def test_all_loss_terms_match_an_independent_transcription_of_the_official_step():
    """Every loss term against the official forward_backward, written out with plain formulas
    (separate student passes per crop size, teacher crops swapped, first step: center = 0)."""
    torch.manual_seed(0)
    # LayerScale 1: CLS tokens differ between images, so KoLeo's nearest neighbours are well defined.
    config = tiny_config(model=ModelSettings(preset="tiny", drop_path_rate=0.0, layerscale_value=1.0))
    arch = SSLMetaArch(config).train()
    with torch.no_grad():
        for p in arch.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = fake_batch(config, images=3, seed=1)
    out = arch(batch, teacher_temp=0.05)

    n_local, t_teacher, t_student = config.crops.local_crops_number, 0.05, 0.1
    masks, indices = batch["masks"], batch["mask_indices"]
    with torch.no_grad():
        teacher_out = arch.teacher["backbone"](batch["global_crops"])
        t_cls = teacher_out.pooler_output
        t_cls = torch.cat([t_cls.chunk(2)[1], t_cls.chunk(2)[0]])
        t_patches = teacher_out.last_hidden_state[:, 1:].flatten(0, 1)[indices]
        t_dino = F.softmax(arch.teacher["dino_head"](t_cls) / t_teacher, dim=-1).chunk(2)
        t_ibot = F.softmax(arch.teacher["dino_head"](t_patches) / t_teacher, dim=-1)
    s_global = arch.student["backbone"](batch["global_crops"], bool_masked_pos=masks)
    s_local = arch.student["backbone"](batch["local_crops"])
    head = arch.student["dino_head"]
    s_global_logits = head(s_global.pooler_output).chunk(2)
    s_local_logits = head(s_local.pooler_output).chunk(n_local)
    s_patch_logits = head(s_global.last_hidden_state[:, 1:].flatten(0, 1)[indices])

    def ce(s, t):
        return -(t * F.log_softmax(s / t_student, dim=-1)).sum(-1)

    n_terms = 2 + 2 * n_local
    local = sum(ce(s, t).mean() for s in s_local_logits for t in t_dino) / n_terms
    global_ = (ce(s_global_logits[0], t_dino[0]).mean() + ce(s_global_logits[1], t_dino[1]).mean()) / n_terms
    cls = F.normalize(s_global.pooler_output, dim=-1)
    koleo = 0.0
    for crop in cls.chunk(2):
        d = torch.cdist(crop, crop) + torch.eye(len(crop)) * 10
        koleo = koleo - torch.log((crop - crop[d.argmin(1)] + 1e-8).norm(dim=-1) + 1e-8).mean()
    per_patch_weight = (1 / masks.sum(1).clamp(min=1)).repeat_interleave(masks.sum(1))
    ibot = (ce(s_patch_logits, t_ibot) * per_patch_weight).sum() / len(masks)

    torch.testing.assert_close(out["dino_local_crops_loss"], local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["dino_global_crops_loss"], global_, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["koleo_loss"], 0.1 * koleo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ibot_loss"], ibot, rtol=1e-5, atol=1e-6)


def test_head_mlp_bias_option():
    """head_mlp_bias=false builds bias-free head MLPs (student and teacher); the default keeps them."""
    default = SSLMetaArch(tiny_config(ibot=IbotSettings(separate_head=True, head_n_prototypes=48)))
    assert any(name.endswith("mlp.0.bias") for name, _ in default.student["ibot_head"].named_parameters())
    arch = SSLMetaArch(
        tiny_config(
            dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, head_mlp_bias=False),
            ibot=IbotSettings(separate_head=True, head_n_prototypes=48, head_mlp_bias=False),
        )
    )
    for part in (arch.student, arch.teacher):
        for head in ("dino_head", "ibot_head"):
            assert not [name for name, _ in part[head].named_parameters() if name.endswith("bias")]


def test_compiled_blocks_give_the_eager_losses_and_gradients():
    """compile_blocks (train.compile=true) changes speed, not the step: same losses and gradients.

    Dynamo's "aot_eager" backend traces and partitions the blocks like inductor does, without a C++
    build, so the check stays fast on a CPU.
    """
    config = tiny_config()
    batch = fake_batch(config)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        arch = SSLMetaArch(config).train()
        if compiled:
            torch._dynamo.reset()
            arch.compile_blocks(backend="aot_eager")
        out = arch(batch, teacher_temp=0.07)
        out["loss"].backward()
        if compiled:  # the blocks really went through dynamo
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
        grads = {n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), grads))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
