"""Random cache records of the right shapes: the training step without decoding or encoding any video.

The benchmark times the step of a full-size UNet this way (no VAE pass over 384×384×16 frames), and
tests drive the loop with exact control over videos and clips.
"""

from __future__ import annotations

import numpy as np

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import CacheRecord, fingerprint


def synthetic_records(backbone: BackboneSpec, *, videos: int = 1, clips_per_video: int = 1, frames: int = 4,
                      latent_size: tuple[int, int] = (8, 8), caption: str = "a synthetic clip",
                      seed: int = 0) -> list[CacheRecord]:
    """`videos` × `clips_per_video` records with N(0, 1) latent means, std 0.1 and N(0, 1) text embeddings."""
    rng = np.random.default_rng(seed)
    channels = backbone.unet.config.in_channels
    tokens, text_dim = backbone.tokenizer.model_max_length, backbone.unet.config.cross_attention_dim
    text = rng.standard_normal((tokens, text_dim)).astype(np.float16)
    factor = 2 ** (len(backbone.vae.config.block_out_channels) - 1)  # pixels per latent
    records = []
    for video in range(videos):
        for clip in range(clips_per_video):
            shape = (channels, frames, *latent_size)
            records.append(CacheRecord(
                dataset="synthetic", video_path=f"synthetic-{video}.mp4", video_index=video,
                content_hash=fingerprint("synthetic", seed, video), clip_index=clip,
                frame_indices=list(range(clip * frames, (clip + 1) * frames)), source_fps=8.0, caption=caption,
                size=(latent_size[0] * factor, latent_size[1] * factor), crop="center",
                latent_mean=rng.standard_normal(shape).astype(np.float16),
                latent_std=np.full(shape, 0.1, dtype=np.float16), text_embedding=text,
                latent_fingerprint=fingerprint("synthetic-latent", seed, video, clip),
                text_fingerprint=fingerprint("synthetic-text", seed, caption)))
    return records
