"""The one sampler: DDIM with classifier-free guidance, plus DDIM inversion for the noise prior.

Validation samples during training, `motiondirector generate`, the toy-world benchmark and the
Serve app all sample through `sample_latents`; LoRA routing and scales are set by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from motiondirector.backbones.base import BackboneSpec


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 30
    guidance: float = 12.0
    frames: int = 16
    height: int = 384
    width: int = 384
    eta: float = 0.0


def latent_shape(backbone: BackboneSpec, settings: SamplingSettings, batch: int) -> tuple[int, ...]:
    factor = 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    if settings.height % factor or settings.width % factor:
        raise ValueError(f"--size {settings.height}x{settings.width}: both sides must be multiples of {factor}")
    channels = backbone.unet.config.in_channels
    return (batch, channels, settings.frames, settings.height // factor, settings.width // factor)


def _scheduler(backbone: BackboneSpec, steps: int) -> DDIMScheduler:
    # A private copy: sampling must not change the state of the backbone's scheduler.
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_latents(
    backbone: BackboneSpec,
    prompts: list[str],
    settings: SamplingSettings,
    *,
    initial_noise: torch.Tensor,
    negative_prompt: str = "",
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM from `initial_noise` (B, C, F, h, w) to scaled clean latents, one prompt per batch item."""
    if initial_noise.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but initial noise for {initial_noise.shape[0]} videos")
    scheduler = _scheduler(backbone, settings.steps)
    device = backbone.device
    text = backbone.encode_text(list(prompts))
    guided = settings.guidance > 1.0
    if guided:
        negative = backbone.encode_text([negative_prompt] * len(prompts))
        text = torch.cat([negative, text])
    dtype = backbone.unet.dtype
    latents = initial_noise.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    for index, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t).to(dtype)
        prediction = backbone.predict(model_input, t.to(device).expand(model_input.shape[0]), text.to(dtype))
        prediction = prediction.float()
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + settings.guidance * (cond - uncond)
        latents = scheduler.step(prediction, t, latents, eta=settings.eta, generator=generator).prev_sample
        if on_step is not None:
            on_step(index + 1, len(scheduler.timesteps))
    return latents


@torch.no_grad()
def sample_videos(backbone: BackboneSpec, prompts: list[str], settings: SamplingSettings, *,
                  initial_noise: torch.Tensor, negative_prompt: str = "",
                  on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Prompts -> frames (B, F, H, W, 3) float in [0, 1]."""
    latents = sample_latents(backbone, prompts, settings, initial_noise=initial_noise,
                             negative_prompt=negative_prompt, on_step=on_step)
    return backbone.decode_latents(latents.to(backbone.vae.dtype))


@torch.no_grad()
def ddim_invert(backbone: BackboneSpec, latents: torch.Tensor, steps: int = 50, prompt: str = "",
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run DDIM backwards from clean scaled latents to noise (the noise prior's z_inv), unguided."""
    scheduler = _scheduler(backbone, steps)
    text = backbone.encode_text([prompt] * latents.shape[0])
    dtype = backbone.unet.dtype
    alphas = scheduler.alphas_cumprod.to(latents.device)
    timesteps = list(reversed(scheduler.timesteps.tolist()))
    step_gap = scheduler.config.num_train_timesteps // steps
    current = latents.float()
    for index, t in enumerate(timesteps):
        previous_t = t - step_gap
        alpha_prev = alphas[previous_t] if previous_t >= 0 else scheduler.final_alpha_cumprod.to(latents.device)
        alpha_t = alphas[t]
        eps = backbone.predict(current.to(dtype), torch.full((current.shape[0],), t, device=current.device),
                               text.to(dtype)).float()
        clean = (current - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
        current = alpha_t.sqrt() * clean + (1 - alpha_t).sqrt() * eps
        if on_step is not None:
            on_step(index + 1, steps)
    return current
