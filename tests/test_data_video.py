"""Decoding real reference videos and images, and a clear error for each kind of bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
from PIL import Image

from motiondirector.data import DataError, content_hash, probe_video, read_frames, read_image
from motiondirector.data.clips import ClipPolicy, plan_clips


def write_video(path: Path, num_frames: int, fps: int = 8, size: int = 32, codec: str = "libx264",
                options: dict | None = None, noise: bool = False) -> np.ndarray:
    """A small real video whose frame k is a flat grey of level 10 * k (identifiable), or noise (large)."""
    if noise:
        frames = np.random.default_rng(0).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    else:
        frames = np.stack([np.full((size, size, 3), 10 * k % 256, np.uint8) for k in range(num_frames)])
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return frames


def test_probe_and_read_car_turn(car_turn):
    info = probe_video(str(car_turn))
    assert (info.num_frames, info.fps, info.width, info.height, info.duration) == (16, 8.0, 480, 480, 2.0)
    frames = read_frames(str(car_turn), [0, 5, 5, 15])
    assert frames.shape == (4, 480, 480, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[1], frames[2])  # a repeated index returns the same frame
    assert np.abs(frames[0].astype(int) - frames[3]).mean() > 1  # the car moved


def test_probe_bicycle_rates(reference_dir):
    infos = {p.name[14:30]: probe_video(str(p)) for p in sorted((reference_dir / "bicycle").glob("*.mp4"))}
    assert sorted((i.num_frames, round(i.fps, 3)) for i in infos.values()) == [
        (193, 25.0), (205, 29.97), (427, 25.0), (600, 30.0)]
    assert {(i.width, i.height) for i in infos.values()} == {(596, 336)}


def test_read_frames_keeps_the_requested_frames(tmp_path):
    path = tmp_path / "ramp.mp4"
    write_video(path, 12)
    frames = read_frames(str(path), [0, 4, 11])
    # lossy codec: the flat grey level of frame k (10 * k) survives within a few levels
    np.testing.assert_allclose(frames.reshape(3, -1).mean(axis=1), [0, 40, 110], atol=3)


def test_webm_without_frame_count_is_counted(tmp_path):
    path = tmp_path / "clip.webm"
    write_video(path, 10, codec="libvpx")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no frame count
    assert probe_video(str(path)).num_frames == 10


def test_fsspec_urls_work(car_turn):
    memory = fsspec.filesystem("memory")
    memory.pipe("/videos/car.mp4", car_turn.read_bytes())
    url = "memory:///videos/car.mp4"
    assert probe_video(url).num_frames == 16
    np.testing.assert_array_equal(read_frames(url, [3]), read_frames(str(car_turn), [3]))
    assert content_hash(url) == content_hash(str(car_turn))
    memory.rm("/videos", recursive=True)


def test_read_image_and_hash(reference_dir):
    image = read_image(str(reference_dir / "img_car" / "car.jpg"))
    assert image.shape == (459, 690, 3) and image.dtype == np.uint8
    assert content_hash(str(reference_dir / "img_car" / "car.jpg")) == \
        "f5ff1eb0b57e39bc532e9b0a86326cf8f44098f3f3016f800a4be7f2e7b66f05"


# --- bad input: each reason, with the file named ---------------------------------------------------

def _error(call, *args) -> DataError:
    with pytest.raises(DataError) as caught:
        call(*args)
    assert str(caught.value).startswith(f"{caught.value.path}: ")
    return caught.value


def test_zero_byte_video_and_image(tmp_path):
    for name, reader in (("empty.mp4", probe_video), ("empty.jpg", read_image)):
        (tmp_path / name).write_bytes(b"")
        error = _error(reader, str(tmp_path / name))
        assert error.path == str(tmp_path / name) and error.reason == "zero-byte file"


def test_truncated_video_header_at_end(tmp_path, car_turn):
    path = tmp_path / "cut.mp4"
    path.write_bytes(car_turn.read_bytes()[:60_000])  # the moov atom (index) is at the end: cut off
    error = _error(probe_video, str(path))
    assert error.reason.startswith("truncated or corrupt video")


def test_truncated_video_header_first(tmp_path):
    path = tmp_path / "faststart.mp4"
    write_video(path, 40, size=64, options={"movflags": "faststart"}, noise=True)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])  # the index survives, most frame data does not
    assert probe_video(str(path)).num_frames == 40
    error = _error(read_frames, str(path), [0, 39])
    assert error.reason.startswith("truncated or corrupt video")


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are not the frames you are looking for\n" * 20)
    assert _error(probe_video, str(path)).reason.startswith("not a video")


def test_too_short_video(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, 12, fps=24)
    error = _error(plan_clips, probe_video(str(path)), ClipPolicy(frames=16, fps=8))
    assert error.path == str(path)
    assert error.reason == "too short: has 12 frames at 24 fps, needs 46 (16 frames at 8 fps)"


def test_unsupported_images(tmp_path):
    random_bytes = tmp_path / "noise.jpg"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    assert _error(read_image, str(random_bytes)).reason.startswith("unsupported image format")
    gif = tmp_path / "anim.png"
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert _error(read_image, str(gif)).reason.startswith("unsupported image format GIF")


def test_truncated_image(tmp_path, reference_dir):
    path = tmp_path / "cut.jpg"
    path.write_bytes((reference_dir / "img_car" / "car.jpg").read_bytes()[:5000])
    assert _error(read_image, str(path)).reason.startswith("truncated or corrupt image")


def test_missing_file_and_pickling(tmp_path):
    error = _error(probe_video, str(tmp_path / "nope.mp4"))
    assert error.reason == "no such file"
    copy = pickle.loads(pickle.dumps(error))  # Ray ships exceptions between processes
    assert (type(copy), copy.path, copy.reason, str(copy)) == (DataError, error.path, error.reason, str(error))
