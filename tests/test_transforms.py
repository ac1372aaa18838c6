"""Multi-crop augmentation: geometry distributions and photometric operations vs reference formulas."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinov2_hf.data.transforms import (
    BatchedPhotometric,
    MultiCropGeometry,
    MultiCropSettings,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    random_resized_crop_box,
    solarize,
)


def test_crop_boxes_follow_scale_and_ratio():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(3000):
        left, top, right, bottom = random_resized_crop_box(640, 427, (0.05, 0.32), rng)
        assert 0 <= left < right <= 640 and 0 <= top < bottom <= 427
        areas.append((right - left) * (bottom - top) / (640 * 427))
        ratios.append((right - left) / (bottom - top))
    areas, ratios = np.array(areas), np.array(ratios)
    assert 0.045 <= areas.min() and areas.max() <= 0.33
    assert abs(areas.mean() - (0.05 + 0.32) / 2) < 0.01  # uniform in scale
    assert 0.74 <= ratios.min() and ratios.max() <= 1.35
    assert abs(np.log(ratios).mean()) < 0.02  # log-uniform around 1


def test_geometry_outputs_and_flips():
    settings = MultiCropSettings(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    geometry = MultiCropGeometry(settings, seed=0)
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))  # brighter to the right
    image = Image.fromarray(gradient)
    flips = 0
    for _ in range(200):
        out = geometry(image)
        assert [c.shape for c in out["global_crops"]] == [(3, 32, 32)] * 2
        assert [c.shape for c in out["local_crops"]] == [(3, 16, 16)] * 3
        assert out["global_crops"][0].dtype == torch.uint8
        crop = out["global_crops"][0].float()
        flips += crop[0, :, 0].mean() > crop[0, :, -1].mean()
    assert 70 < flips < 130  # p = 0.5


def test_brightness_contrast_saturation_formulas():
    x = torch.tensor([[[[0.2, 0.8]], [[0.4, 0.6]], [[0.0, 1.0]]]])  # (1, 3, 1, 2)
    torch.testing.assert_close(adjust_brightness(x.clone(), torch.tensor([1.5])), (x * 1.5).clamp(0, 1))
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    mean = gray.mean()
    torch.testing.assert_close(adjust_contrast(x.clone(), torch.tensor([0.5])), (0.5 * x + 0.5 * mean).clamp(0, 1))
    torch.testing.assert_close(adjust_saturation(x.clone(), torch.tensor([0.0])), gray.unsqueeze(1).expand_as(x))


def test_hue_matches_pil_hsv_rotation():
    """Against PIL's own HSV conversion on a smooth image (PIL quantises HSV to 8 bits)."""
    rng = np.random.RandomState(0)
    array = (rng.rand(8, 8, 3) * 255).astype(np.uint8)
    for shift in (0.05, -0.1, 0.5):
        h, s, v = Image.fromarray(array).convert("HSV").split()
        h = Image.fromarray(((np.asarray(h).astype(np.int32) + int(round(shift * 256))) % 256).astype(np.uint8))
        reference = np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB")).astype(np.float32) / 255
        ours = adjust_hue(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, torch.tensor([shift]))
        assert np.abs(ours[0].permute(1, 2, 0).numpy() - reference).mean() < 0.02


def test_hue_identity_and_full_turn():
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(2)), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(adjust_hue(x, torch.ones(2)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [12, 136])  # CPU: one grouped convolution; above 128x128, one image at a time
def test_blur_matches_explicit_2d_gaussian(size):
    torch.manual_seed(0)
    x = torch.rand(2, 3, size, size)
    sigmas = torch.tensor([0.5, 1.7])
    ours = gaussian_blur(x, sigmas)
    for i, sigma in enumerate(sigmas):
        t = torch.arange(9, dtype=torch.float32) - 4
        k1 = torch.exp(-0.5 * (t / sigma) ** 2)
        k2 = torch.outer(k1, k1)
        k2 = k2 / k2.sum()
        padded = F.pad(x[i : i + 1], (4, 4, 4, 4), mode="reflect")
        expected = F.conv2d(padded, k2.expand(3, 1, 9, 9), groups=3)
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=1e-5, atol=1e-6)


def test_solarize_threshold_is_pil_128():
    x = torch.tensor([127 / 255, 128 / 255, 1.0, 0.0])
    torch.testing.assert_close(solarize(x), torch.tensor([127 / 255, 1 - 128 / 255, 0.0, 0.0]))


def blur_marker(monkeypatch):
    """Replace the blur by a marker (-10) so that which images were blurred can be counted exactly."""
    import dinov2_hf.data.transforms as transforms

    monkeypatch.setattr(transforms, "gaussian_blur", lambda images, sigmas, kernel_size=9: torch.full_like(images, -10.0))


def test_photometric_probabilities(monkeypatch):
    blur_marker(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    crops = (torch.rand(4000, 3, 8, 8, generator=generator) * 255).to(torch.uint8)
    photometric = BatchedPhotometric(color_jitter_prob=0.0, solarize_prob=0.0, blur="intended")
    out = photometric.local_crops(crops, generator)
    pixels = out * torch.tensor(photometric.std).view(1, 3, 1, 1) + torch.tensor(photometric.mean).view(1, 3, 1, 1)
    blurred = ((pixels + 10.0).abs() < 1e-4).flatten(1).all(1)  # the marker, through normalise and back
    assert abs(blurred.float().mean().item() - 0.5) < 0.03  # local crops: p = 0.5
    gray = (pixels[:, 0] - pixels[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
    assert abs(gray[~blurred].float().mean().item() - 0.2) < 0.03  # RandomGrayscale(p=0.2)


def test_global_crops_blur_and_solarize_per_crop_index(monkeypatch):
    blur_marker(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    crops = (torch.rand(2000, 3, 8, 8, generator=generator) * 255).to(torch.uint8)
    for blur, (p1, p2) in {"intended": (1.0, 0.1), "official": (0.0, 0.9)}.items():
        photometric = BatchedPhotometric(color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0, blur=blur)
        out = photometric.global_crops(crops, generator)
        pixels = out * torch.tensor(photometric.std).view(1, 3, 1, 1) + torch.tensor(photometric.mean).view(1, 3, 1, 1)
        blurred = ((pixels + 10.0).abs() < 1e-4).flatten(1).all(1)  # the marker, through normalise and back
        assert abs(blurred[:1000].float().mean().item() - p1) < 0.03
        assert abs(blurred[1000:].float().mean().item() - p2) < 0.03
    photometric = BatchedPhotometric(color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.2, blur="official")
    monkeypatch.undo()
    out = photometric.global_crops(crops, generator)
    pixels = (out * torch.tensor(photometric.std).view(1, 3, 1, 1) + torch.tensor(photometric.mean).view(1, 3, 1, 1)) * 255
    solarized = (pixels.round() - (255 - crops.float())).abs().flatten(1).amax(1) < 0.5
    assert solarized[:1000].sum() == 0  # global crop 1 is never solarized (and not blurred here)
    with pytest.raises(ValueError, match="intended"):
        BatchedPhotometric(blur="sometimes")


def test_color_jitter_random_order_and_probability():
    generator = torch.Generator().manual_seed(0)
    photometric = BatchedPhotometric(color_jitter_prob=0.8)
    x = torch.rand(3000, 3, 2, 2, generator=generator)
    out = photometric.color_jitter(x.clone(), generator)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert abs(changed.float().mean().item() - 0.8) < 0.03
