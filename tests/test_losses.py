"""TinyBERT losses against independent computations on small real tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (HiddenProjections, attention_loss, hidden_loss, hinton_kd,
                            intermediate_losses, regression_loss, soft_cross_entropy)


@pytest.fixture
def padded_pair():
    """Two examples of 3 and 5 real tokens, 2 heads, padded to 5, padding zero as the cache pads."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    student = torch.randn(2, 2, 5, 5)
    teacher = torch.randn(2, 2, 5, 5)
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).bool()
    teacher = teacher.masked_fill(~pair, 0.0)
    return student, teacher, mask, pair


def test_attention_masked_mode_averages_real_pairs_only(padded_pair):
    student, teacher, mask, pair = padded_pair
    expected = sum(((student[b, :, :n, :n] - teacher[b, :, :n, :n]) ** 2).sum() for b, n in ((0, 3), (1, 5)))
    expected = expected / (2 * (9 + 25))
    assert torch.allclose(attention_loss(student, teacher, mask, "masked"), expected)
    # student values at padding cannot matter
    noisy = student.masked_fill(~pair, 1e4)
    assert torch.allclose(attention_loss(noisy, teacher, mask, "masked"), expected)


def test_attention_reference_mode_averages_over_every_element(padded_pair):
    student, teacher, mask, pair = padded_pair
    squared = ((student.masked_fill(~pair, 0) - teacher) ** 2).sum()
    assert torch.allclose(attention_loss(student, teacher, mask, "reference"), squared / student.numel())
    # with no score <= -100 the two modes differ by the share of real pairs
    masked = attention_loss(student, teacher, mask, "masked")
    ratio = pair.sum() * 2 / student.numel()
    assert torch.allclose(attention_loss(student, teacher, mask, "reference"), masked * ratio)


def test_attention_reference_mode_zeroes_scores_below_minus_100(padded_pair):
    student, teacher, mask, _ = padded_pair
    student = student.clone()
    student[1, 0, 2, 3] = 0.0
    as_zero = attention_loss(student, teacher, mask, "reference")
    student[1, 0, 2, 3] = -500.0          # a real pair, but at the reference's mask level
    assert attention_loss(student, teacher, mask, "reference") == as_zero
    assert attention_loss(student, teacher, mask, "masked") > as_zero   # masked mode keeps it


def test_attention_heads_must_match(padded_pair):
    student, teacher, mask, _ = padded_pair
    with pytest.raises(ValueError, match="heads must match"):
        attention_loss(student[:, :1], teacher, mask)
    with pytest.raises(ValueError, match="unknown attention loss mode"):
        attention_loss(student, teacher, mask, "softmax")


def test_hidden_loss_over_real_tokens_only():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    teacher[0, 2] = 0
    real = mask.bool()
    expected = F.mse_loss(student[real], teacher[real])
    assert torch.allclose(hidden_loss(student, teacher, mask), expected)
    student[0, 2] = 1e3
    assert torch.allclose(hidden_loss(student, teacher, mask), expected)


def test_soft_cross_entropy_equals_cross_entropy_with_probability_targets():
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    for t in (1.0, 2.0):
        expected = F.cross_entropy(student / t, F.softmax(teacher / t, dim=-1))
        assert torch.allclose(soft_cross_entropy(student, teacher, t), expected)
    # minimised (gradient zero) when the student reproduces the teacher
    student = teacher.clone().requires_grad_(True)
    soft_cross_entropy(student, teacher).backward()
    assert student.grad.abs().max() < 1e-6


def test_hinton_kd_mixes_soft_kl_times_t_squared_and_hard_labels():
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    t, alpha = 3.0, 0.7
    p_teacher = F.softmax(teacher / t, -1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, -1))).sum(-1).mean()
    ce = F.cross_entropy(student, labels)
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert torch.allclose(hinton_kd(student, teacher, labels, t, alpha), expected, atol=1e-6)
    assert torch.allclose(hinton_kd(student, teacher, labels, t, 0.0), ce)


def test_regression_loss_targets_the_teacher_not_the_labels():
    student = torch.tensor([[1.0], [2.0]])
    teacher = torch.tensor([[1.5], [2.0]])
    assert regression_loss(student, teacher).item() == pytest.approx(0.125)


def test_projection_modes_and_intermediate_losses():
    torch.manual_seed(4)
    shared = HiddenProjections(8, 16, [0, 1, 2], "shared")
    per_layer = HiddenProjections(8, 16, [0, 1, 2], "per_layer")
    assert sum(p.numel() for p in shared.parameters()) == 8 * 16 + 16
    assert sum(p.numel() for p in per_layer.parameters()) == 3 * (8 * 16 + 16)
    mask = torch.ones(2, 3, dtype=torch.long)
    s_hidden = {l: torch.randn(2, 3, 8) for l in (0, 1, 2)}
    t_hidden = {l: torch.randn(2, 3, 16) for l in (0, 2, 4)}
    s_scores = {l: torch.randn(2, 2, 3, 3) for l in (1, 2)}
    t_scores = {l: torch.randn(2, 2, 3, 3) for l in (2, 4)}
    losses = intermediate_losses(s_hidden, s_scores, t_hidden, t_scores, [(1, 2), (2, 4)], mask,
                                 per_layer, "masked")
    assert torch.allclose(losses["embedding"], F.mse_loss(per_layer(0, s_hidden[0]), t_hidden[0]))
    expected_hidden = (F.mse_loss(per_layer(1, s_hidden[1]), t_hidden[2])
                       + F.mse_loss(per_layer(2, s_hidden[2]), t_hidden[4]))
    assert torch.allclose(losses["hidden"], expected_hidden)
    expected_attention = F.mse_loss(s_scores[1], t_scores[2]) + F.mse_loss(s_scores[2], t_scores[4])
    assert torch.allclose(losses["attention"], expected_attention)
    assert "attention" not in intermediate_losses(s_hidden, s_scores, t_hidden, t_scores, [(1, 2)],
                                                  mask, shared, "masked", with_attention=False)


def test_equal_widths_start_from_the_identity_map():
    """A teacher-initialised student is already in the teacher's space: no loss from the map."""
    torch.manual_seed(5)
    states = torch.randn(2, 3, 8)
    for mode in ("shared", "per_layer"):
        same = HiddenProjections(8, 8, [0, 1], mode)
        assert torch.equal(same(1, states), states)
        mask = torch.ones(2, 3, dtype=torch.long)
        assert hidden_loss(same(0, states), states.clone(), mask).item() == 0.0
    wider = HiddenProjections(8, 16, [0, 1], "shared")
    assert wider(0, states).shape == (2, 3, 16) and wider.maps["shared"].weight.abs().sum() > 0
