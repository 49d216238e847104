"""The two pure stages between files and cache records.

decode (CPU, no model): SourceItem -> DecodedClip (frames fitted to the training size)
encode (the backbone's VAE and text encoder): DecodedClip -> CacheRecord
`plan_item` is decode without the pixels: enough to compute fingerprints and skip cached clips.
The record cache (data/cache.py) and ingestion (data/ingest_plan.py, distributed by Ray) call
`plan_item`, `decode_plans`, `encode_latents`, `encode_texts` and `make_record` separately, so
that only uncached parts are decoded and encoded; `decode_item` + `encode_clips` is the same path
without skipping (the single-process reference in tests and bench/ingest.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from motiondirector.data import records
from motiondirector.data.clips import closest_bucket, fit_frames, plan_clips
from motiondirector.data.records import CacheRecord
from motiondirector.data.sources import DatasetSpec, SourceItem
from motiondirector.data.video import content_hash, probe_video, read_frames, read_image

HFLIP_CROP_SUFFIX = "+hflip"  # part of `crop`, so a mirrored image has its own latent fingerprint
_TEXT_BATCH = 32


@dataclass(kw_only=True)
class ClipPlan:
    """Everything about one clip except its pixels."""

    dataset: str
    concept: str | None
    video_path: str
    video_index: int
    content_hash: str
    clip_index: int
    frame_indices: list[int]
    source_fps: float  # 0.0 for a still image
    caption: str
    size: tuple[int, int]  # (height, width) of the fitted frames
    crop: str  # "center" | "bucket", plus "+hflip" for a mirrored image
    is_image: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def latent_fingerprint(self, vae_id: str) -> str:
        # ints, not numpy scalars: the fingerprint's JSON would spell those as strings
        size = (int(self.size[0]), int(self.size[1]))
        return records.latent_fingerprint(self.content_hash, self.frame_indices, size, self.crop, vae_id)

    def text_fingerprint(self, text_encoder_id: str) -> str:
        return records.text_fingerprint(self.caption, text_encoder_id)


@dataclass(kw_only=True)
class DecodedClip(ClipPlan):
    """A clip ready for the encoders: frames (F, H, W, 3) uint8 at `size`."""

    frames: np.ndarray


def _target_size(spec: DatasetSpec, height: int, width: int) -> tuple[int, int]:
    return closest_bucket(height, width, spec.buckets) if spec.buckets else tuple(spec.size)


def plan_item(item: SourceItem, spec: DatasetSpec) -> list[ClipPlan]:
    """The clips one file yields under `spec`; reads the video header (or the image), not the video's frames."""
    common = dict(dataset=spec.name, concept=spec.concept, video_path=item.path, video_index=item.video_index,
                  content_hash=content_hash(item.path), caption=item.caption)
    if item.kind == "video":
        info = probe_video(item.path)
        size = _target_size(spec, info.height, info.width)
        return [ClipPlan(**common, clip_index=index, frame_indices=indices, source_fps=info.fps, size=size,
                         crop=spec.crop) for index, indices in enumerate(plan_clips(info, spec.clip_policy))]
    height, width = read_image(item.path).shape[:2]
    size = _target_size(spec, height, width)
    # A still image is a clip of `frames` copies. hflip p > 0 adds the mirrored copy as a second clip;
    # `weight` says how often a sampler should pick each to flip with probability p.
    orientations = [(False, 1.0 - spec.hflip), (True, spec.hflip)] if spec.hflip else [(False, 1.0)]
    return [ClipPlan(**common, clip_index=index, frame_indices=[0] * spec.frames, source_fps=0.0, size=size,
                     crop=spec.crop + (HFLIP_CROP_SUFFIX if mirrored else ""), is_image=True,
                     extra={"hflip": mirrored, "weight": weight} if spec.hflip else {})
            for index, (mirrored, weight) in enumerate(orientations) if weight > 0]


def decode_plans(plans: Sequence[ClipPlan]) -> list[DecodedClip]:
    """Decode the pixels of planned clips; each file is decoded once however many clips it yields."""
    decoded: list[DecodedClip] = []
    by_path: dict[str, list[ClipPlan]] = {}
    for plan in plans:
        by_path.setdefault(plan.video_path, []).append(plan)
    for path, file_plans in by_path.items():
        if file_plans[0].is_image:
            pixels, position = read_image(path)[None], {0: 0}
        else:
            wanted = sorted({i for plan in file_plans for i in plan.frame_indices})
            pixels, position = read_frames(path, wanted), {index: n for n, index in enumerate(wanted)}
        fitted: dict[tuple[int, int], np.ndarray] = {}
        for plan in file_plans:
            if plan.size not in fitted:  # fit the union of frames once per size
                fitted[plan.size] = fit_frames(pixels, plan.size, "center")
            frames = fitted[plan.size][[position[i] for i in plan.frame_indices]]
            if plan.crop.endswith(HFLIP_CROP_SUFFIX):
                frames = np.ascontiguousarray(frames[:, :, ::-1])
            decoded.append(DecodedClip(**vars(plan), frames=frames))
    return decoded


def decode_item(item: SourceItem, spec: DatasetSpec) -> list[DecodedClip]:
    """CPU stage: one source file -> its clips with fitted frames. Raises DataError for a bad file."""
    return decode_plans(plan_item(item, spec))


def encode_latents(backbone, clips: Sequence[DecodedClip], batch_size: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """VAE posterior (mean, std) of each clip: unscaled, float16, (C, F, h, w)."""
    latents: list[tuple[np.ndarray, np.ndarray]] = []
    start = 0
    while start < len(clips):
        shape = clips[start].frames.shape  # batch only clips of one shape (buckets differ)
        end = start + 1
        while end < len(clips) and end - start < batch_size and clips[end].frames.shape == shape:
            end += 1
        batch = torch.from_numpy(np.stack([clip.frames for clip in clips[start:end]]))
        posterior = backbone.encode_video(batch)
        mean = posterior.mean.float().cpu().numpy().astype(np.float16)
        std = posterior.std.float().cpu().numpy().astype(np.float16)
        latents.extend(zip(mean, std, strict=True))
        start = end
    return latents


def encode_texts(backbone, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Text embedding (L, D) float16 of each distinct caption."""
    unique = list(dict.fromkeys(captions))
    embeddings: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), _TEXT_BATCH):
        chunk = unique[start:start + _TEXT_BATCH]
        encoded = backbone.encode_text(chunk).float().cpu().numpy().astype(np.float16)
        embeddings.update(zip(chunk, encoded, strict=True))
    return embeddings


def make_record(plan: ClipPlan, latent: tuple[np.ndarray, np.ndarray], text_embedding: np.ndarray,
                vae_id: str, text_encoder_id: str) -> CacheRecord:
    """A record from a plan and its encoded parts (fresh or reused from the cache)."""
    # plain Python scalars: after a trip through Ray Data, plan fields may be numpy values
    return CacheRecord(dataset=plan.dataset, concept=plan.concept, video_path=plan.video_path,
                       video_index=int(plan.video_index), content_hash=plan.content_hash,
                       clip_index=int(plan.clip_index), frame_indices=[int(i) for i in plan.frame_indices],
                       source_fps=float(plan.source_fps), caption=plan.caption,
                       size=(int(plan.size[0]), int(plan.size[1])), crop=plan.crop,
                       latent_mean=latent[0], latent_std=latent[1], text_embedding=text_embedding,
                       latent_fingerprint=plan.latent_fingerprint(vae_id),
                       text_fingerprint=plan.text_fingerprint(text_encoder_id), is_image=bool(plan.is_image),
                       extra=dict(plan.extra))


def encode_clips(backbone, clips: Sequence[DecodedClip], batch_size: int = 1) -> list[CacheRecord]:
    """Model stage: decoded clips -> cache records (deterministic: the posterior's mean and std, no sampling)."""
    latents = encode_latents(backbone, clips, batch_size)
    texts = encode_texts(backbone, [clip.caption for clip in clips])
    return [make_record(clip, latent, texts[clip.caption], backbone.vae_id, backbone.text_encoder_id)
            for clip, latent in zip(clips, latents, strict=True)]
