"""Reading videos (PyAV) and images (Pillow) from any fsspec path, with errors that name the file.

Every function takes a local path or an fsspec URL (s3://, gs://, memory://, ...), so the Ray
ingestion stages can call them unchanged on remote data.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import av
import fsspec
import numpy as np

from motiondirector.data.errors import DataError
from motiondirector.storage import sha256_file

# Leading bytes of containers we know are videos: a file that starts like one but cannot be
# opened is truncated or corrupt rather than "not a video".
_VIDEO_SIGNATURES = (
    (4, b"ftyp"),  # MP4 / MOV / M4V
    (4, b"moov"), (4, b"mdat"), (4, b"wide"), (4, b"free"),  # QuickTime files without ftyp
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM (EBML)
    (0, b"RIFF"),  # AVI
    (0, b"OggS"), (0, b"FLV"), (0, b"GIF8"),
)
SUPPORTED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # Pillow format names


@dataclass(frozen=True)
class VideoInfo:
    """What a clip plan needs to know about a video. `path` names it in errors."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration: float  # seconds: num_frames / fps
    path: str = ""


def _size_or_raise(path: str) -> int:
    fs, stripped = fsspec.core.url_to_fs(path)
    try:
        size = fs.size(stripped)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    if not size:
        raise DataError(path, "zero-byte file")
    return int(size)


def _ffmpeg_reason(error: Exception) -> str:
    """FFmpeg's message without the errno and file name it repeats."""
    return getattr(error, "strerror", None) or str(error)


def _looks_like_video(head: bytes) -> bool:
    return any(head[offset:offset + len(magic)] == magic for offset, magic in _VIDEO_SIGNATURES)


@contextmanager
def _open_video(path: str):
    """Open `path` with PyAV; yields (container, video stream). Turns FFmpeg errors into DataError."""
    _size_or_raise(path)
    with fsspec.open(path, "rb") as handle:
        head = handle.read(16)
        handle.seek(0)
        try:
            container = av.open(handle, "r")
        except (av.FFmpegError, UnicodeDecodeError) as error:
            if _looks_like_video(head):
                raise DataError(path, f"truncated or corrupt video (cannot read the container: {_ffmpeg_reason(error)})") from None
            raise DataError(path, f"not a video (FFmpeg cannot read it: {_ffmpeg_reason(error)})") from None
        with container:
            if not container.streams.video:
                raise DataError(path, "not a video (the file has no video stream)")
            yield container, container.streams.video[0]


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.base_rate, stream.guessed_rate):
        if rate:
            return Fraction(rate)
    return None


def probe_video(path: str) -> VideoInfo:
    """Frame count, frame rate and size of a video, from the container header when it has them."""
    with _open_video(path) as (container, stream):
        rate = _frame_rate(stream)
        if rate is None:
            raise DataError(path, "corrupt video (the container reports no frame rate)")
        num_frames = stream.frames
        if not num_frames:  # e.g. Matroska/WebM store no frame count: count the packets instead
            try:
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            except av.FFmpegError as error:
                raise DataError(path, f"truncated or corrupt video ({_ffmpeg_reason(error)})") from None
        width, height = stream.codec_context.width, stream.codec_context.height
    if not num_frames or not width or not height:
        raise DataError(path, f"corrupt video (header says {num_frames} frames of {width}x{height})")
    fps = float(rate)
    return VideoInfo(num_frames=int(num_frames), fps=fps, width=int(width), height=int(height),
                     duration=num_frames / fps, path=str(path))


def read_frames(path: str, frame_indices: Iterable[int]) -> np.ndarray:
    """Decode the video once, in order, keeping only `frame_indices` (repeats allowed): (F, H, W, 3) uint8.

    Frame i is the i-th decoded frame in presentation order, as counted by `probe_video`.
    """
    wanted = [int(i) for i in frame_indices]
    if not wanted:
        raise ValueError("read_frames needs at least one frame index")
    if min(wanted) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(wanted)}")
    keep = set(wanted)
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in keep:
                    kept[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last:
                    break
        except av.FFmpegError as error:
            raise DataError(path, f"truncated or corrupt video (decoding failed after {decoded} frames: {_ffmpeg_reason(error)})") \
                from None
    if decoded <= last:
        raise DataError(path, f"truncated or corrupt video (decoded only {decoded} frames, frame {last} was asked for)")
    return np.stack([kept[i] for i in wanted])


def read_image(path: str) -> np.ndarray:
    """A still image as (H, W, 3) uint8 RGB, EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    _size_or_raise(path)
    with fsspec.open(path, "rb") as handle:
        try:
            image = Image.open(handle)
        except UnidentifiedImageError:
            raise DataError(path, "unsupported image format (not an image Pillow can read; "
                                  f"supported: {', '.join(SUPPORTED_IMAGE_FORMATS)})") from None
        if image.format not in SUPPORTED_IMAGE_FORMATS:
            raise DataError(path, f"unsupported image format {image.format} "
                                  f"(supported: {', '.join(SUPPORTED_IMAGE_FORMATS)})")
        try:
            image = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError) as error:
            raise DataError(path, f"truncated or corrupt image ({error})") from None
    return np.array(image, dtype=np.uint8)  # a writable copy


def content_hash(path: str) -> str:
    """sha256 of the file's bytes (hex): the identity of a source in fingerprints."""
    return sha256_file(path)
