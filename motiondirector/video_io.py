"""Writing generated videos: mp4, gif and a png frame grid.

Frames are (F, H, W, 3), either float in [0, 1] (what `BackboneSpec.decode_latents` returns per
video) or uint8, as a torch tensor or a numpy array. Every writer goes through a temp name in the
target folder and a rename (`atomic_write`), so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from motiondirector.storage import atomic_write


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] or uint8 -> contiguous uint8 numpy array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("no frames to write")
    if frames.dtype != np.uint8:
        frames = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(frames)


def _write_encoded(path: str | Path, encode: Callable[[BinaryIO], None]) -> Path:
    # Encode in memory (videos here are small), then publish with one atomic rename.
    buffer = io.BytesIO()
    encode(buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return path


def write_video(frames: torch.Tensor | np.ndarray, path: str | Path, fps: float = 8) -> Path:
    """H.264 mp4 (yuv420p, what every player reads). Odd sides are padded by one edge pixel."""
    import av

    pixels = to_uint8_frames(frames)
    _, height, width, _ = pixels.shape
    # yuv420p needs even sides; repeat the last row/column rather than fail on odd sizes.
    pixels = np.pad(pixels, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")

    def encode(handle: BinaryIO) -> None:
        with av.open(handle, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = pixels.shape[2], pixels.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
            for frame in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return _write_encoded(path, encode)


def write_gif(frames: torch.Tensor | np.ndarray, path: str | Path, fps: float = 8) -> Path:
    """Looping animated gif."""
    images = [Image.fromarray(frame) for frame in to_uint8_frames(frames)]

    def encode(handle: BinaryIO) -> None:
        images[0].save(handle, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), loop=0)

    return _write_encoded(path, encode)


def frame_grid(frames: torch.Tensor | np.ndarray, columns: int | None = None) -> np.ndarray:
    """All frames tiled row by row into one (rows·H, columns·W, 3) uint8 image (unused cells black)."""
    pixels = to_uint8_frames(frames)
    count, height, width, _ = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, frame in enumerate(pixels):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = frame
    return grid


def write_grid_png(frames: torch.Tensor | np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    """One png with every frame (a preview that needs no video player)."""
    image = Image.fromarray(frame_grid(frames, columns))
    return _write_encoded(path, lambda handle: image.save(handle, format="PNG"))

