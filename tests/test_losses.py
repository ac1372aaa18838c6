"""Losses and teacher targets against direct reference computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2_hf.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp


def test_dino_loss_matches_pairwise_cross_entropy():
    torch.manual_seed(0)
    students = [torch.randn(5, 32) for _ in range(3)]
    teachers = [F.softmax(torch.randn(5, 32), dim=-1) for _ in range(2)]
    loss = DINOLoss(32, student_temp=0.1)(students, teachers)
    expected = 0.0
    for s in students:
        for t in teachers:
            for b in range(5):
                log_p = s[b] / 0.1 - torch.logsumexp(s[b] / 0.1, dim=0)
                expected -= (t[b] * log_p).sum().item() / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_softmax_centering_uses_previous_steps_center():
    torch.manual_seed(0)
    loss = DINOLoss(8, center_momentum=0.9)
    batches = [torch.randn(6, 8) for _ in range(3)]
    center = torch.zeros(1, 8)
    for batch in batches:
        targets = loss.softmax_center_teacher(batch, teacher_temp=0.05)
        torch.testing.assert_close(targets, F.softmax((batch - center) / 0.05, dim=-1))
        loss.update_center(batch)
        center = 0.9 * center + 0.1 * batch.mean(0, keepdim=True)  # applied at the next call
    loss.softmax_center_teacher(batches[0], 0.05)
    torch.testing.assert_close(loss.center, center)


def reference_sinkhorn(logits: np.ndarray, temp: float, iterations: int = 3) -> np.ndarray:
    q = np.exp(logits.astype(np.float64) / temp).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_knopp_matches_reference_and_marginals():
    torch.manual_seed(0)
    logits = torch.randn(16, 10)
    targets = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    np.testing.assert_allclose(targets.numpy(), reference_sinkhorn(logits.numpy(), 0.5), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))  # one distribution per sample
    # prototypes share the mass almost equally (exact in the limit of iterations)
    many = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=50)
    torch.testing.assert_close(many.sum(dim=0), torch.full((10,), 16 / 10), rtol=1e-4, atol=1e-4)


def test_ibot_loss_matches_reference_and_dense_form():
    torch.manual_seed(0)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 4:9] = True  # images 1 and 3 unmasked
    student = torch.randn(4, 9, 16)
    teacher = F.softmax(torch.randn(4, 9, 16), dim=-1)
    loss = iBOTPatchLoss(16, student_temp=0.1)
    masked = loss.forward_masked(student[masks], teacher[masks], masks)
    expected = 0.0
    for i in range(4):
        n = int(masks[i].sum())
        for p in range(9):
            if masks[i, p]:
                ce = -(teacher[i, p] * F.log_softmax(student[i, p] / 0.1, dim=-1)).sum()
                expected += ce.item() / n
    expected /= 4  # all global-crop images count, masked or not
    assert masked.item() == pytest.approx(expected, rel=1e-5)
    assert loss(student, teacher, masks).item() == pytest.approx(expected, rel=1e-5)


def test_ibot_center_is_mean_over_masked_patches():
    loss = iBOTPatchLoss(4, center_momentum=0.5)
    patches = torch.arange(12, dtype=torch.float32).view(3, 4)
    loss.update_center(patches)
    loss.softmax_center_teacher(patches.unsqueeze(0), 1.0)
    torch.testing.assert_close(loss.center, 0.5 * patches.mean(0).view(1, 1, 4))


def test_koleo_matches_brute_force():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    features = F.normalize(x, dim=-1)
    distances = torch.cdist(features, features) + torch.eye(8) * 10
    nearest = distances.argmin(dim=1)
    expected = -torch.log((features - features[nearest] + 1e-8).norm(dim=-1) + 1e-8).mean()
    torch.testing.assert_close(KoLeoLoss()(x), expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_koleo_finite_at_tiny_batches(batch):
    x = torch.randn(batch, 5, requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    if batch == 2:  # two distinct points: -log of their distance
        f = F.normalize(x.detach(), dim=-1)
        assert loss.item() == pytest.approx(-math.log((f[0] - f[1] + 1e-8).norm().item() + 1e-8), rel=1e-5)
    else:
        assert loss.item() == 0.0


def test_koleo_runs_in_float32_under_autocast():
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x.bfloat16())
    assert loss.dtype == torch.float32
