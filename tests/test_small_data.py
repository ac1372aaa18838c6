"""Small-data training ([learns]): short runs are complete runs, the blur scales with the crop size,
the SimDINO objective's math, collapse handling (stop_on_collapse, stop_at_step) and the monitor's test split."""

import json

import pytest
import torch
from test_trainer import tiny_config, write_cifar_subset

from dinov2_hf.data.transforms import BatchedPhotometric, MultiCropSettings, blur_kernel_size, gaussian_blur
from dinov2_hf.losses import SimDINOLoss, SimDINOPatchLoss, coding_rate
from dinov2_hf.objective import DinoSettings, IbotSettings, ModelSettings, SSLConfig
from dinov2_hf.objective.meta_arch import SimDINOMetaArch, build_meta_arch, collapse_advice
from dinov2_hf.objective.schedules import ScheduleSettings, build_schedules
from dinov2_hf.training.config import load_train_config
from dinov2_hf.training.trainer import Trainer

# -- short runs compress their schedules -------------------------------------------------------------------


def test_a_shortened_run_compresses_every_schedule():
    """The quickstart's schedule (10 x 40 steps: lr warm-up 1 epoch, teacher temperature warm-up 3, prototypes
    frozen 1) fitted to 100 steps: every length scales by 1/4."""
    config = ScheduleSettings(epochs=10, epoch_length=40, base_lr=0.004, warmup_epochs=1, warmup_teacher_temp_epochs=3,
                            freeze_last_layer_epochs=1, teacher_temp=0.07, warmup_teacher_temp=0.04, min_lr=1e-6)
    nominal, short = build_schedules(config, 1024), build_schedules(config, 1024, total_iters=100)
    assert short.lr.warmup_iters == 10 and nominal.lr.warmup_iters == 40
    assert short.lr[0] == 0.0 and short.lr[9] == pytest.approx(0.004)  # warm-up over 10 steps, peak at step 9
    assert short.lr[5] == pytest.approx(0.004 * 5 / 9)
    assert short.lr[10 + 45] == pytest.approx((0.004 + 1e-6) / 2)  # the cosine's middle: 45 of its 90 steps
    assert short.lr[100] == 1e-6 and nominal.lr[100] > 0.003  # the short run ends its cosine; the nominal one is early in it
    assert short.teacher_temp[29] == pytest.approx(0.07) and short.teacher_temp[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert short.last_layer_lr[9] == 0.0 and short.last_layer_lr[10] == short.lr[10] > 0
    assert short.momentum[50] == pytest.approx((0.992 + 1.0) / 2) and short.weight_decay[99] == pytest.approx(0.4, rel=1e-3)
    # The schedule's own length (or none given) is the official schedule, value for value.
    same = build_schedules(config, 1024, total_iters=400)
    assert all(same.at(i) == nominal.at(i) for i in range(0, 420, 7))


def test_train_max_steps_fits_the_main_and_adaptation_phases(cifar_dir, tmp_path):
    config = tiny_config(cifar_dir, tmp_path, ("adaptation.global_crops_size=48", "adaptation.local_crops_size=24",
                                               "adaptation.schedule.epochs=1", "adaptation.schedule.epoch_length=4"), max_steps=6)
    assert config.nominal_steps == 12 and config.total_steps == 6 and config.main_steps == 4  # 8:4 scaled to 4:2
    assert load_train_config("quickstart").total_steps == 400
    with pytest.raises(ValueError, match="train.max_steps=-1 must be at least 1"):
        load_train_config("quickstart", ["train.max_steps=-1"])
    with pytest.raises(ValueError, match="train.stop_on_collapse"):
        load_train_config("quickstart", ["train.stop_on_collapse=-2"])


# -- augmentations scale with the crop size ----------------------------------------------------------------


def test_blur_scales_with_the_crop_size():
    assert blur_kernel_size(1.0) == 9 and blur_kernel_size(32 / 224) == 3 and blur_kernel_size(98 / 224) == 5
    assert blur_kernel_size(2.0) == 17
    official = BatchedPhotometric.for_crops(32, "intended")  # 0: the official 224-px blur at any size
    assert official.blur_kernel_size == 9 and official.blur_sigma == (0.1, 2.0)
    scaled = BatchedPhotometric.for_crops(32, "intended", blur_reference_size=224)
    assert scaled.blur_kernel_size == 3 and scaled.blur_sigma == pytest.approx((0.1 / 7, 2.0 / 7))
    assert BatchedPhotometric.for_crops(224, "intended", 224).blur_kernel_size == 9  # official sizes: unchanged
    # At 32 px the official blur (sigma 2) spreads a bright pixel far more than the scaled one (sigma 2/7).
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16, 16] = 1.0
    assert gaussian_blur(image, torch.tensor([2.0]), 9)[0, 0, 16, 16] < 0.05
    assert gaussian_blur(image, torch.tensor([2.0 / 7]), 3)[0, 0, 16, 16] > 0.99
    none = BatchedPhotometric(blur="none", color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)
    crops = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(none.global_crops(crops.clone()), none.normalize(crops.float() / 255))


# -- SimDINO ----------------------------------------------------------------------------------------------


def test_coding_rate_matches_its_formula():
    features = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=-1)
    expected = 0.5 * torch.logdet(torch.eye(8, dtype=torch.float64) + 8 / (16 * 0.05) * features.t() @ features)
    assert coding_rate(features, 0.05).item() == pytest.approx(expected.item(), rel=1e-5)
    # Identical features span one direction: far less rate than spread ones.
    same = features[:1].expand(16, -1)
    assert coding_rate(same) < 0.25 * coding_rate(features)


def test_simdino_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert SimDINOLoss.alignment([s], [t]).item() == pytest.approx(-(0.6 + 1.0) / 2)
    loss = SimDINOLoss(eps=0.5)
    views = [s, t]
    m, p = 2, 2
    rates = [0.5 * torch.logdet(torch.eye(2) + p / (m * 0.5) * v.t() @ v) for v in views]
    assert loss.expansion(views).item() == pytest.approx(((rates[0] + rates[1]) / 2 * (p + m) / (p * m)).item(), rel=1e-5)
    masks = torch.tensor([[True, False], [True, True]])
    weights = torch.tensor([1.0, 0.5, 0.5])
    student, teacher = torch.eye(3), torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    assert SimDINOPatchLoss().forward_masked(student, teacher, masks, weights).item() == pytest.approx(-(1.0 + 0.0 + 0.5) / 2)


def _simdino_config(**changes) -> SSLConfig:
    return SSLConfig(
        model=ModelSettings(preset="tiny", drop_path_rate=0.0, layerscale_value=0.1),
        crops=MultiCropSettings(global_crops_size=56, local_crops_size=28, local_crops_number=2),
        dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16),
        ibot=IbotSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16),
        objective="simdino", **changes,
    )


def _batch(images: int = 4, size: int = 56, local: int = 28, n_local: int = 2) -> dict:
    from dinov2_hf.data.collate import MultiCropCollator

    generator = torch.Generator().manual_seed(0)
    batch = {"global_crops": torch.randn(2 * images, 3, size, size, generator=generator),
             "local_crops": torch.randn(n_local * images, 3, local, local, generator=generator)}
    batch.update(MultiCropCollator(size, 14, seed=0).masks(2 * images))
    return batch


def test_simdino_step_matches_its_terms_and_trains_every_part():
    torch.manual_seed(0)
    arch = build_meta_arch(_simdino_config())
    assert isinstance(arch, SimDINOMetaArch)
    assert not any("last_layer" in name for name, _ in arch.named_parameters())  # no prototypes
    batch = _batch()
    out = arch(batch, teacher_temp=0.04)
    # The total is the sum of its recorded terms; the alignment is a mean cosine over 2 + 2 x 2 pairs.
    terms = out["dino_alignment_loss"] + out["dino_expansion_loss"] + out["koleo_loss"] + out["ibot_loss"]
    assert out["loss"].item() == pytest.approx(terms.item(), rel=1e-6)
    assert -1.0 <= out["dino_alignment_loss"].item() <= 1.0 and out["dino_expansion_loss"].item() < 0
    assert set(out) >= {"cls_std", "alignment", "collapse"} and "teacher_entropy" not in out
    out["loss"].backward()
    trainable = [name for name, p in arch.student.named_parameters() if p.requires_grad]
    assert all(arch.student.get_parameter(name).grad is not None for name in trainable)
    # The teacher targets are the teacher's own normalised head outputs, crops swapped.
    teacher_cls, _ = arch.teacher_targets(batch, 0.04)
    assert torch.allclose(teacher_cls.norm(dim=-1), torch.ones(2, 4))


def test_collapse_advice_names_the_keys():
    flat = collapse_advice({"teacher_entropy": 0.999, "teacher_batch_entropy": 0.99, "cls_std": 0.5})
    assert "flat collapse" in flat and "centering=sinkhorn_knopp" in flat and "schedule.teacher_temp" in flat
    assert "train.stop_on_collapse" in flat and "one-prototype" not in flat
    assert "one-prototype" in collapse_advice({"teacher_entropy": 0.1, "teacher_batch_entropy": 0.01, "cls_std": 0.5})
    assert "dino.koleo_loss_weight" in collapse_advice({"cls_std": 0.01})


# -- the trainer: stop_on_collapse, stop_at_step, the monitor's test source -------------------------------


def test_stop_on_collapse_stops_with_a_checkpoint(cifar_dir, tmp_path):
    """LayerScale 1e-5 (official) gives every image the same CLS at initialisation: cls_std ~ 0, a collapse
    the indicator flags at every step; the run stops after the 2 such steps that follow the 2-step warm-up."""
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=96)
    config = tiny_config(data, tmp_path / "run", ("model.layerscale_value=1e-5",), stop_on_collapse=2)
    trainer = Trainer(config)
    result = trainer.train()
    history = result.history
    assert result.stopped_on_collapse and [r["collapse"] for r in history] == [1.0] * 4
    assert trainer.step == 4  # steps 0-1 warm up; 2 and 3 are the 2 counted after it
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "export").exists()


def test_stop_at_step_then_resume_completes_the_run(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=96)
    stopped = Trainer(tiny_config(data, tmp_path / "run", stop_at_step=5, save_every=100))
    assert len(stopped.train().history) == 5 and not (tmp_path / "run" / "export").exists()
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5
    resumed = Trainer(tiny_config(data, tmp_path / "run", save_every=100)).train().history
    assert [r["step"] for r in resumed] == [5, 6, 7]
    assert (tmp_path / "run" / "export" / "transformers" / "model.safetensors").is_file()


def test_monitor_queries_from_a_test_source(cifar_dir, tmp_path):
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=96)
    config = tiny_config(data, tmp_path / "run", max_steps=1)
    config.monitor.every, config.monitor.source, config.monitor.test_source = 1, str(data), str(cifar_dir / "test-00000-of-00001.parquet")
    config.monitor.train_images, config.monitor.test_images = 40, 30
    trainer = Trainer(config)
    pixels, labels = trainer.monitor.images()
    assert len(pixels) == 70
    # The queries are the first 30 test images (the subset's first rows are the test split's too).
    assert torch.equal(pixels[40:], pixels[:30]) and torch.equal(labels[40:], labels[:30])
    assert 0.0 <= trainer.knn_monitor() <= 1.0


def test_gpu_ssl_check_workers_draw_different_crops_and_masks():
    """Two DataLoader workers over identical images: each worker has its own crop and mask RNG."""
    import importlib.util
    import io
    from pathlib import Path

    import numpy as np
    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_ssl_check.py"
    spec = importlib.util.spec_from_file_location("gpu_ssl_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from dinov2_hf.data.collate import MultiCropCollator
    from dinov2_hf.data.transforms import MultiCropGeometry, MultiCropSettings

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    geometry = MultiCropGeometry(MultiCropSettings(global_crops_size=32, local_crops_size=16, local_crops_number=1))
    collator = MultiCropCollator(32, 4)
    loader = torch.utils.data.DataLoader(module.CropDataset([buffer.getvalue()] * 4, geometry), batch_size=2, num_workers=2,
                                         collate_fn=collator, worker_init_fn=module.seed_workers(geometry, collator),
                                         generator=torch.Generator().manual_seed(0))
    first, second = list(loader)  # one batch from each worker
    assert not torch.equal(first["global_crops"], second["global_crops"])
    assert not torch.equal(first["masks"], second["masks"])


def test_sinkhorn_knopp_at_low_temperature():
    """At T = 0.005 exp(logit / T) overflows float32 (the official computation gives NaN); shifting by the maximum
    gives the same targets as the exact computation in float64. At the official temperatures nothing changes."""
    from dinov2_hf.losses import sinkhorn_knopp

    logits = torch.nn.functional.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    exact = torch.exp(logits.double() / 0.005).t()
    exact /= exact.sum()
    for _ in range(3):
        exact /= exact.sum(dim=1, keepdim=True) * 32
        exact /= exact.sum(dim=0, keepdim=True) * 16
    targets = sinkhorn_knopp(logits, 0.005)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets.double(), (exact * 16).t(), atol=1e-5)
    official = torch.exp(logits / 0.04).t()
    official /= official.sum()
    for _ in range(3):
        official /= official.sum(dim=1, keepdim=True)
        official /= 32
        official /= official.sum(dim=0, keepdim=True)
        official /= 16
    assert torch.equal(sinkhorn_knopp(logits, 0.04), (official * 16).t())  # bit for bit


def test_flip_probability_zero_never_flips_and_keeps_the_crop_stream():
    import numpy as np
    from PIL import Image

    from dinov2_hf.data.transforms import MultiCropGeometry, MultiCropSettings

    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    settings = dict(global_crops_size=32, local_crops_size=16, local_crops_number=2, global_crops_scale=(1.0, 1.0))
    flipping = MultiCropGeometry(MultiCropSettings(**settings), seed=3)
    never = MultiCropGeometry(MultiCropSettings(**settings, flip_probability=0.0), seed=3)
    unflipped = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    flips = 0
    for _ in range(8):
        a, b = flipping(image), never(image)
        for crop_a, crop_b in zip(a["global_crops"], b["global_crops"]):  # scale 1, ratio 1: the whole image
            assert torch.equal(crop_b, unflipped)
            flips += not torch.equal(crop_a, crop_b)
            assert torch.equal(crop_a, crop_b) or torch.equal(crop_a, crop_b.flip(-1))  # same box, maybe mirrored
    assert 0 < flips < 16


# -- the shipped small-data recipes do not collapse ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["quickstart", "cifar10_cpu"])
def test_small_data_recipes_do_not_flat_collapse(recipe, cifar_dir, tmp_path):
    """The first 20 steps of each recipe as shipped (its own schedules; ``train.stop_at_step``): from step 10 on the
    teacher's targets are far from uniform (normalised entropy <= 0.95, the issue's bound; measured 0.92 -> 0.90 over
    steps 10-19 on the digits, 0.89 -> 0.80 on CIFAR-10, falling further after; the official settings stay above
    0.98) and spread over the prototypes (batch entropy >= 0.9: no one-prototype collapse)."""
    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.stop_at_step=20", "monitor.every=0", "train.num_workers=0"]
    if recipe == "cifar10_cpu":
        overrides.append(f"data.source={write_cifar_subset(cifar_dir, tmp_path / 'data', rows=1000)}")
    history = Trainer(load_train_config(recipe, overrides)).train().history
    assert len(history) == 20
    late = history[10:]
    assert max(r["teacher_entropy"] for r in late) <= 0.95, [round(r["teacher_entropy"], 3) for r in history]
    assert min(r["teacher_batch_entropy"] for r in late) >= 0.9
    assert not any(r["collapse"] for r in late)
