"""The MotionDirector losses (method.md), on (B, C, F, h, w) predictions and targets.

All losses are computed in fp32, so a bf16/fp16 forward under autocast yields the same loss
arithmetic as an fp32 one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FRAME_AXIS = 2


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target.float())


def spatial_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spatial path: MSE on the single frame the spatial path denoised."""
    return _mse(pred, target)


def temporal_loss_org(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Temporal path, the original diffusion loss: MSE over the whole clip."""
    return _mse(pred, target)


def debias(x: torch.Tensor, anchor_index: int, beta: float = 1.0) -> torch.Tensor:
    """φ(x)_f = sqrt(β²+1)·x_f − β·x_anchor over the frame axis: removes what all frames share with the anchor."""
    frames = x.shape[FRAME_AXIS]
    if not 0 <= anchor_index < frames:
        raise ValueError(f"anchor frame {anchor_index} is outside the clip's {frames} frames")
    anchor = x.narrow(FRAME_AXIS, anchor_index, 1)
    return math.sqrt(beta * beta + 1.0) * x - beta * anchor


def appearance_debiased_loss(pred: torch.Tensor, target: torch.Tensor, anchor_index: int,
                             beta: float = 1.0) -> torch.Tensor:
    """MSE(φ(pred), φ(target)) with the anchor frame `anchor_index` (paper eq. 5)."""
    return _mse(debias(pred.float(), anchor_index, beta), debias(target.float(), anchor_index, beta))


def temporal_loss(pred: torch.Tensor, target: torch.Tensor, anchor_index: int, beta: float = 1.0) -> torch.Tensor:
    """The temporal path's full loss: original + appearance-debiased."""
    return temporal_loss_org(pred, target) + appearance_debiased_loss(pred, target, anchor_index, beta)
