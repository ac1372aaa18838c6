"""The paper's figures: PCA foreground/RGB, mutual-NN patch matching, CLS attention with registers, PNG outputs."""

import numpy as np
import pytest
import torch
from conftest import randomize_
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from PIL import Image
from sklearn.datasets import load_sample_image

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.eval.visualize import cls_attention_maps, match_patches, pca_rgb, save_figures


def test_pca_separates_a_planted_foreground():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 16, 6, 6, generator=g) * 0.3
    truth = torch.zeros(3, 6, 6, dtype=torch.bool)
    truth[:, 1:4, 2:5] = True
    direction = torch.randn(16, generator=g)
    maps += truth[:, None] * direction.view(1, 16, 1, 1) * 3  # foreground patches share a strong offset
    rgb, foreground = pca_rgb(maps)
    if foreground.sum() > truth.sum():  # which sign is foreground is the model's; flip if needed
        rgb, foreground = pca_rgb(maps, foreground_sign=-1)
    np.testing.assert_array_equal(foreground, truth.numpy())
    assert rgb.shape == (3, 6, 6, 3) and rgb.dtype == np.uint8
    assert (rgb[~foreground] == 0).all() and rgb[foreground].max() == 255


def test_matching_recovers_a_permutation_and_respects_masks():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(32, 5, 5, generator=g)
    permutation = torch.randperm(25, generator=g)
    b = a.flatten(1)[:, permutation].reshape(32, 5, 5) + 0.01 * torch.randn(32, 5, 5, generator=g)
    matches = match_patches(a, b)
    assert len(matches) == 25
    assert all(permutation[j].item() == i for i, j, _ in matches)  # b's patch j is a's patch permutation[j]
    assert [s for _, _, s in matches] == sorted((s for _, _, s in matches), reverse=True)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0] = True
    assert {i for i, _, _ in match_patches(a, b, mask_a=mask)} == set(range(5))
    assert len(match_patches(a, b, max_matches=3)) == 3


def test_cls_attention_excludes_registers_and_matches_eager_weights(tiny_kwargs):
    model = randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs, num_register_tokens=4)), std=0.05).eval()
    pixels = torch.randn(2, 3, 56, 70)  # 4 x 5 patches
    maps = cls_attention_maps(model, pixels)
    assert maps.shape == (2, 2, 4, 5)
    with torch.no_grad():
        attention = model(pixels, output_attentions=True).attentions[-1]
    # the map is the CLS row over patches: CLS (1) + registers (4) + patches (20) sum to one
    torch.testing.assert_close(maps.flatten(2).sum(-1) + attention[:, :, 0, :5].sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(maps[:, :, 0, 0], attention[:, :, 0, 5])


def test_save_figures_writes_pngs_of_the_right_size(tmp_path, tiny_kwargs):
    model = randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)), std=0.05).eval()
    images = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    written = save_figures(model, images, tmp_path, size=112)
    assert [len(written[k]) for k in ("pca", "attention", "matches")] == [2, 2, 1]
    assert Image.open(written["pca"][0]).size == (224, 112)
    assert Image.open(written["attention"][1]).size == (112 * 2, 112)  # one tile per head
    assert Image.open(written["matches"][0]).size == (224, 112)
    with pytest.raises(ValueError, match="at least one image"):
        save_figures(model, [], tmp_path)
