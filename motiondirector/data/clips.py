"""Which frames make a clip (clip policy) and how frames are fitted to the training size (geometry)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from motiondirector.data.errors import DataError
from motiondirector.data.video import VideoInfo

# Float frame rates such as 30000/1001 must not push an exact frame time onto the previous frame.
_TIME_EPS = 1e-6
_RESIZE_CHUNK = 16  # frames resized at once: bounds the float32 copy for long sliding-window videos


class ClipPolicy(BaseModel):
    """N frames sampled at `fps` from the start of each video, or sliding windows every `stride` output frames."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frames: int = Field(16, ge=1, description="Frames per clip.")
    fps: float = Field(8.0, gt=0, description="Rate at which the video is sampled (frames per second).")
    mode: Literal["start", "sliding"] = "start"
    stride: int | None = Field(None, ge=1, description="Sliding windows: output frames between clip starts "
                                                       "(default: `frames`, i.e. no overlap).")


def _source_step(info: VideoInfo, policy: ClipPolicy) -> float:
    return info.fps / policy.fps


def _source_index(k: int, step: float) -> int:
    """Output frame k is at time k / fps: take the source frame showing at that time."""
    return int(math.floor(k * step + _TIME_EPS))


def sampled_length(info: VideoInfo, policy: ClipPolicy) -> int:
    """How many frames the video has when sampled at `policy.fps`."""
    return max(0, math.ceil((info.num_frames - _TIME_EPS) / _source_step(info, policy)))


def plan_clips(info: VideoInfo, policy: ClipPolicy) -> list[list[int]]:
    """Source frame indices of each clip. A 25 fps video sampled at 8 fps takes frames 0, 3, 6, 9, 12, 15, 18, ...

    Raises DataError when not even one clip fits.
    """
    step = _source_step(info, policy)
    available = sampled_length(info, policy)
    if available < policy.frames:
        needed = _source_index(policy.frames - 1, step) + 1
        raise DataError(info.path or "<video>",
                        f"too short: has {info.num_frames} frames at {info.fps:g} fps, needs {needed} "
                        f"({policy.frames} frames at {policy.fps:g} fps)")
    if policy.mode == "start":
        starts = [0]
    else:
        starts = list(range(0, available - policy.frames + 1, policy.stride or policy.frames))
    return [[_source_index(start + k, step) for k in range(policy.frames)] for start in starts]


def closest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (h, w) bucket whose aspect ratio is closest to height x width (log scale: 2:1 is as far as 1:2)."""
    if not buckets:
        raise ValueError("closest_bucket needs at least one (height, width) bucket")
    aspect = math.log(width / height)
    return min((tuple(b) for b in buckets), key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def fit_frames(frames: np.ndarray, size: tuple[int, int], crop: str = "center",
               buckets: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Resize (F, H, W, 3) uint8 frames so they cover `size` = (h, w), then centre-crop to it.

    crop="bucket" first replaces `size` by the bucket in `buckets` with the closest aspect ratio.
    Resizing is antialiased bilinear, so downscaling does not alias.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
    source_h, source_w = frames.shape[1:3]
    if crop == "bucket":
        if not buckets:
            raise ValueError('crop="bucket" needs a list of (height, width) buckets')
        size = closest_bucket(source_h, source_w, buckets)
    elif crop != "center":
        raise ValueError(f'crop must be "center" or "bucket", got {crop!r}')
    target_h, target_w = size
    scale = max(target_h / source_h, target_w / source_w)
    resized_h, resized_w = max(target_h, round(source_h * scale)), max(target_w, round(source_w * scale))
    if (resized_h, resized_w) != (source_h, source_w):
        frames = np.concatenate([_resize(chunk, (resized_h, resized_w))
                                 for chunk in np.split(frames, range(_RESIZE_CHUNK, len(frames), _RESIZE_CHUNK))])
    top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    return np.ascontiguousarray(frames[:, top:top + target_h, left:left + target_w])
