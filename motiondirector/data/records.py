"""The cache record and the fingerprint function: one format for the whole system.

A record is one training clip after encoding: the VAE latent distribution (mean and std, unscaled,
float16; training samples from it each step and applies the model's scaling factor), the text
embedding, and where it came from. The local cache and Ray ingestion write the same records to
Parquet (binary + shape + dtype columns, readable with pyarrow alone).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def fingerprint(*parts: Any) -> str:
    """The one fingerprint function: sha256 of the canonical JSON of `parts`, as 32 hex chars."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def latent_fingerprint(content_hash: str, frame_indices: list[int], size: tuple[int, int], crop: str,
                       vae_id: str) -> str:
    """Identity of an encoded clip: the same video bytes, frames, geometry and VAE give the same latents."""
    return fingerprint("latent", content_hash, list(map(int, frame_indices)), list(size), crop, vae_id)


def text_fingerprint(caption: str, text_encoder_id: str) -> str:
    """Identity of a text embedding: caption + tokenizer/text encoder."""
    return fingerprint("text", caption, text_encoder_id)


@dataclass
class CacheRecord:
    """One encoded clip. Arrays are numpy: latents (C, F, h, w) float16, text (L, D) float16."""

    dataset: str
    video_path: str
    video_index: int  # position in the dataset's sorted file list (routes per-video spatial LoRAs)
    content_hash: str  # sha256 of the source file's bytes
    clip_index: int
    frame_indices: list[int]
    source_fps: float
    caption: str
    size: tuple[int, int]  # (height, width) of the frames that were encoded
    crop: str  # how frames were fitted to `size` (e.g. "center", "bucket")
    latent_mean: np.ndarray
    latent_std: np.ndarray
    text_embedding: np.ndarray
    latent_fingerprint: str
    text_fingerprint: str
    concept: str | None = None
    is_image: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.latent_mean.shape[1])
