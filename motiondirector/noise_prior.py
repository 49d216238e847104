"""The noise prior (method.md): start sampling from a reference clip's inverted noise.

Initial latents = sqrt(p)·z_inv + sqrt(1−p)·N(0, I), z_inv a 50-step DDIM inversion of the clip
with an empty prompt. `generate` uses it for single-video motions, the training loop for its
validation samples (`validation.noise_prior`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import fingerprint
from motiondirector.lora import inject
from motiondirector.sample import SamplingSettings, ddim_invert, latent_shape
from motiondirector.storage import atomic_write, cache_root

NOISE_PRIOR_INVERSION_STEPS = 50


def reference_clip(video: str | Path, frames: int, size: tuple[int, int], fps: float) -> tuple[torch.Tensor, str]:
    """The first `frames` frames of `video` sampled at `fps` and fitted to `size`: (1, F, H, W, 3) uint8.

    Returns the frames and their fingerprint (content hash, frame indices, size, crop).
    """
    from motiondirector.data.clips import ClipPolicy, fit_frames, plan_clips
    from motiondirector.data.video import content_hash, probe_video, read_frames

    path = str(video)
    indices = plan_clips(probe_video(path), ClipPolicy(frames=frames, fps=fps))[0]
    pixels = fit_frames(read_frames(path, indices), size, crop="center")
    identity = fingerprint("reference-clip", content_hash(path), indices, list(size), "center")
    return torch.from_numpy(pixels).unsqueeze(0), identity


def noise_prior_latents(backbone: BackboneSpec, video: str | Path, *, frames: int, size: tuple[int, int],
                        fps: float, cache_dir: str | Path | None = None,
                        on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """z_inv (1, C, F, h, w): 50-step DDIM inversion of the reference clip with an empty prompt.

    Inverted with the base model alone (no adapters), so the result only depends on the clip and
    the base and is cached under the cache root by their fingerprint.
    """
    clip, clip_id = reference_clip(video, frames, size, fps)
    key = fingerprint("noise-prior", clip_id, backbone.model_id, backbone.architecture_fingerprint,
                      backbone.vae_id, NOISE_PRIOR_INVERSION_STEPS)
    cached = cache_root(cache_dir) / "noise_prior" / f"{key}.safetensors"
    if cached.is_file():
        return load_file(str(cached))["z_inv"]
    # The posterior mean, not a sample: the prior must not depend on a random draw.
    latents = backbone.encode_video(clip).mean * backbone.latent_scaling_factor
    with inject.active(backbone.unet, []):
        inverted = ddim_invert(backbone, latents, steps=NOISE_PRIOR_INVERSION_STEPS, on_step=on_step)
    inverted = inverted.float().cpu().contiguous()
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, safetensors_bytes({"z_inv": inverted}, metadata={"video": str(video)}))
    return inverted


def initial_noise(backbone: BackboneSpec, settings: SamplingSettings, seed: int,
                  prior: torch.Tensor | None = None, prior_strength: float = 0.0) -> torch.Tensor:
    """N(0, I) from a CPU generator seeded with `seed`, mixed with the prior: sqrt(p)·z_inv + sqrt(1−p)·ε."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latent_shape(backbone, settings, 1), generator=generator, dtype=torch.float32)
    if prior is None or prior_strength == 0:
        return noise
    if tuple(prior.shape) != tuple(noise.shape):
        raise ValueError(f"noise prior has shape {tuple(prior.shape)}, the videos need {tuple(noise.shape)}")
    return math.sqrt(prior_strength) * prior.float() + math.sqrt(1.0 - prior_strength) * noise
