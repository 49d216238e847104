"""Clip policy (which frames) and geometry (resize, centre crop, aspect buckets) on real videos."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from motiondirector.data import ClipPolicy, VideoInfo, closest_bucket, fit_frames, plan_clips, probe_video
from motiondirector.data.clips import sampled_length


def _info(num_frames: int, fps: float) -> VideoInfo:
    return VideoInfo(num_frames=num_frames, fps=fps, width=64, height=64, duration=num_frames / fps, path="v.mp4")


def test_bicycle_clips_sampled_at_8_fps(reference_dir):
    plans = {}
    for path in sorted((reference_dir / "bicycle").glob("*.mp4")):
        info = probe_video(str(path))
        plans[round(info.fps, 2)] = (sampled_length(info, ClipPolicy()), plan_clips(info, ClipPolicy()))
    # 25 fps: a frame every 3.125 source frames; 30 fps: every 3.75; 29.97 (30000/1001): every 3.746
    length, (clip,) = plans[25.0]
    assert clip == [0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37, 40, 43, 46]
    assert length in (62, 137)  # 193 and 427 frames at 25 fps
    length, (clip,) = plans[30.0]
    assert clip == [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41, 45, 48, 52, 56] and length == 160
    length, (clip,) = plans[29.97]
    assert clip == [0, 3, 7, 11, 14, 18, 22, 26, 29, 33, 37, 41, 44, 48, 52, 56] and length == 55


def test_native_rate_takes_consecutive_frames_and_upsampling_repeats(car_turn):
    info = probe_video(str(car_turn))
    assert plan_clips(info, ClipPolicy()) == [list(range(16))]
    assert plan_clips(info, ClipPolicy(frames=6, fps=16)) == [[0, 0, 1, 1, 2, 2]]


def test_sliding_windows():
    info = _info(16, 8)
    assert plan_clips(info, ClipPolicy(frames=4, mode="sliding")) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    windows = plan_clips(info, ClipPolicy(frames=8, mode="sliding", stride=3))
    assert [w[0] for w in windows] == [0, 3, 6] and all(len(w) == 8 for w in windows)
    # stride counts output frames: at 25 -> 8 fps a stride of 8 is about one second of source
    windows = plan_clips(_info(100, 25), ClipPolicy(frames=8, mode="sliding"))
    assert [w[0] for w in windows] == [0, 25, 50, 75] and windows[1] == [25, 28, 31, 34, 37, 40, 43, 46]


def test_too_short_for_one_clip():
    assert len(plan_clips(_info(46, 24), ClipPolicy())) == 1  # exactly enough: frame 45 is the last one needed
    with pytest.raises(ValueError, match=r"^v.mp4: too short: has 45 frames at 24 fps, needs 46"):
        plan_clips(_info(45, 24), ClipPolicy())


def test_policy_rejects_bad_values():
    with pytest.raises(ValidationError, match="strde"):
        ClipPolicy(strde=2)
    with pytest.raises(ValidationError, match="fps"):
        ClipPolicy(fps=0)


def _stripes(height: int, width: int) -> np.ndarray:
    """One frame: left third red, middle third green, right third blue."""
    frame = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    frame[:, :third, 0] = frame[:, third:2 * third, 1] = frame[:, 2 * third:, 2] = 255
    return frame[None]


def test_center_crop_without_resize_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_frames(frames, (32, 32)), frames[:, :, 8:40])


def test_resize_short_side_then_center_crop():
    fitted = fit_frames(_stripes(60, 120), (20, 20))  # -> 20x40, keep the middle 20 columns
    assert fitted.shape == (1, 20, 20, 3) and fitted.dtype == np.uint8
    assert fitted[0, :, 4:16, 1].min() > 200 and fitted[0, :, 4:16, [0, 2]].max() < 50  # the green stripe
    wide = fit_frames(_stripes(30, 90), (40, 60))  # upscaled to 40x120, crop to 60 columns
    assert wide.shape == (1, 40, 60, 3)


def test_real_frames_fit_and_buckets(reference_dir):
    path = next((reference_dir / "bicycle").glob("*young-hipster*.mp4"))
    from motiondirector.data import read_frames

    frames = read_frames(str(path), [0, 3])  # 336 x 596 (landscape)
    assert fit_frames(frames, (32, 32)).shape == (2, 32, 32, 3)
    buckets = [(32, 32), (32, 56), (56, 32)]
    assert fit_frames(frames, (32, 32), crop="bucket", buckets=buckets).shape == (2, 32, 56, 3)
    assert fit_frames(frames.transpose(0, 2, 1, 3), (32, 32), crop="bucket", buckets=buckets).shape == (2, 56, 32, 3)


def test_closest_bucket_uses_aspect_ratio():
    buckets = [(384, 384), (320, 576), (576, 320)]
    assert closest_bucket(336, 596, buckets) == (320, 576)
    assert closest_bucket(1000, 900, buckets) == (384, 384)
    assert closest_bucket(900, 400, buckets) == (576, 320)
    assert closest_bucket(100, 100, [(64, 64), (32, 32)]) == (64, 64)  # a tie goes to the first listed
    with pytest.raises(ValueError, match="bucket"):
        fit_frames(np.zeros((1, 8, 8, 3), np.uint8), (8, 8), crop="bucket")


def test_long_clips_resize_in_chunks_like_single_frames():
    frames = np.random.default_rng(1).integers(0, 256, (40, 50, 70, 3), dtype=np.uint8)  # > one resize chunk
    per_frame = np.concatenate([fit_frames(frame[None], (32, 32)) for frame in frames])
    np.testing.assert_array_equal(fit_frames(frames, (32, 32)), per_frame)
