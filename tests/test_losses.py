"""Losses against values worked out by hand (method.md; paper eq. 5)."""

from __future__ import annotations

import math

import pytest
import torch

from motiondirector.losses import (
    appearance_debiased_loss,
    debias,
    spatial_loss,
    temporal_loss,
    temporal_loss_org,
)

SQRT2 = math.sqrt(2.0)


def clip(*frames: float) -> torch.Tensor:
    """A (B=1, C=1, F, h=1, w=1) clip with one value per frame."""
    return torch.tensor(frames, dtype=torch.float32).reshape(1, 1, len(frames), 1, 1)


# pred - target per frame is d = [1, 2] in all the two-frame cases below.
PRED, TARGET = clip(1.0, 3.0), clip(0.0, 1.0)


def test_spatial_loss_is_mse_of_the_frame():
    pred = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 1, 2)
    target = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 1, 2)
    # ((1 - 0)² + (3 - 1)²) / 2
    assert spatial_loss(pred, target).item() == pytest.approx(2.5)


def test_temporal_org_is_mse_over_the_clip():
    assert temporal_loss_org(PRED, TARGET).item() == pytest.approx(2.5)


def test_debias_formula():
    # φ(x)_f = √2·x_f − x_0 for x = [1, 3]: [√2 − 1, 3√2 − 1]
    out = debias(PRED, anchor_index=0, beta=1.0).flatten().tolist()
    assert out == pytest.approx([SQRT2 - 1, 3 * SQRT2 - 1])


@pytest.mark.parametrize(("anchor", "beta", "expected"), [
    # φ(d) = √2·d − d_0 = [√2 − 1, 2√2 − 1]; squares 3 − 2√2 and 9 − 4√2; mean 6 − 3√2
    (0, 1.0, 6 - 3 * SQRT2),
    # φ(d) = √2·d − d_1 = [√2 − 2, 2√2 − 2]; squares 6 − 4√2 and 12 − 8√2; mean 9 − 6√2
    (1, 1.0, 9 - 6 * SQRT2),
    # β = 2: φ(d) = √5·d − 2·d_0 = [√5 − 2, 2√5 − 2]; squares 9 − 4√5 and 24 − 8√5; mean (33 − 12√5) / 2
    (0, 2.0, (33 - 12 * math.sqrt(5)) / 2),
    # β = 0: φ is the identity, so the debiased loss is the plain MSE (1 + 4) / 2
    (1, 0.0, 2.5),
])
def test_appearance_debiased_loss(anchor, beta, expected):
    assert appearance_debiased_loss(PRED, TARGET, anchor, beta).item() == pytest.approx(expected, rel=1e-6)


def test_temporal_loss_is_org_plus_ad():
    assert temporal_loss(PRED, TARGET, anchor_index=0).item() == pytest.approx(2.5 + 6 - 3 * SQRT2, rel=1e-6)


def test_debias_acts_on_the_frame_axis_per_channel():
    # Two channels, three frames: channel 1 is channel 0 times 10, so its loss terms are 100x larger.
    pred = torch.tensor([[1.0, 2.0, 4.0], [10.0, 20.0, 40.0]]).reshape(1, 2, 3, 1, 1)
    target = torch.zeros_like(pred)
    # channel 0, anchor 2: φ = √2·[1, 2, 4] − 4 = [√2 − 4, 2√2 − 4, 4√2 − 4]
    per_frame = [(SQRT2 - 4) ** 2, (2 * SQRT2 - 4) ** 2, (4 * SQRT2 - 4) ** 2]
    expected = sum(per_frame) * (1 + 100) / 6
    assert appearance_debiased_loss(pred, target, anchor_index=2).item() == pytest.approx(expected, rel=1e-6)


def test_losses_run_in_fp32_and_carry_gradients():
    pred = PRED.to(torch.bfloat16).requires_grad_(True)
    loss = temporal_loss(pred, TARGET.to(torch.bfloat16), anchor_index=0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="outside the clip's 2 frames"):
        appearance_debiased_loss(PRED, TARGET, anchor_index=2)
    with pytest.raises(ValueError, match=r"prediction shape \(1, 1, 2, 1, 1\) != target shape"):
        spatial_loss(PRED, clip(1.0))
