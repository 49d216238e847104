"""The one sampler: DDIM with classifier-free guidance, plus DDIM inversion for the noise prior.

Validation samples during training, `motiondirector generate`, the toy-world benchmark and the
Serve app all sample through `sample_latents`; LoRA routing and scales are set by the caller.

Whatever the base's scheduler config says is honoured: `prediction_type` epsilon, v_prediction or
sample; `rescale_betas_zero_snr` (zero terminal SNR) and `timestep_spacing` leading, trailing or
linspace. The steps are diffusers' own `DDIMScheduler.step`, so sampling equals diffusers'
`TextToVideoSDPipeline` with the same scheduler, embeddings and noise (tests/test_sample_vpred.py).
Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
§3.4) is optional: at zero terminal SNR strong guidance over-exposes, and rescaling the guided
output to the conditional output's standard deviation counters it.
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
    guidance_rescale: float = 0.0  # φ of Lin et al. 2024 §3.4; 0 = plain classifier-free guidance


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
    first = int(scheduler.timesteps[0])
    if scheduler.config.prediction_type == "epsilon" and float(scheduler.alphas_cumprod[first]) == 0.0:
        # x0 = (x - sqrt(1 - ᾱ)·ε) / sqrt(ᾱ) has no value at ᾱ = 0: an ε model cannot start there.
        raise ValueError(f"the base's scheduler has zero terminal SNR (rescale_betas_zero_snr) and "
                         f"{scheduler.config.timestep_spacing!r} spacing starts at t = {first}, where an epsilon "
                         "model's clean estimate is undefined; such a base needs prediction_type v_prediction")
    return scheduler


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, eq. 15–16): blend the guided output with itself rescaled to
    the conditional output's standard deviation (per video, over all other axes) by `factor`."""
    if factor == 0.0:
        return guided
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=axes, keepdim=True) / guided.std(dim=axes, keepdim=True))
    return factor * rescaled + (1.0 - factor) * guided


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
            prediction = rescale_guidance(uncond + settings.guidance * (cond - uncond), cond,
                                          settings.guidance_rescale)
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


def step_coefficients(scheduler: DDIMScheduler, timestep: int) -> tuple[float, float]:
    """(a, b) with `scheduler.step(m, t, x, eta=0).prev_sample == a·x + b·m` for the set timesteps.

    A deterministic DDIM step is linear in the sample x and the model output m for every prediction
    type (for v-prediction it is a rotation: a² + b² = 1). The coefficients are read off the
    scheduler's own step, so the inversion undoes exactly the step the sampler takes, with its rule
    for the previous timestep under any spacing.
    """
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        raise ValueError("DDIM inversion needs a linear step: the base's scheduler clips or thresholds x0 "
                         "(clip_sample / thresholding)")
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    a = float(scheduler.step(zero, timestep, one, eta=0.0).prev_sample)
    b = float(scheduler.step(one, timestep, zero, eta=0.0).prev_sample)
    return a, b


@torch.no_grad()
def ddim_invert(backbone: BackboneSpec, latents: torch.Tensor, steps: int = 50, prompt: str = "",
                on_step: Callable[[int, int], None] | None = None, *, refine: int = 0) -> torch.Tensor:
    """Run DDIM backwards from clean scaled latents to noise (the noise prior's z_inv), unguided.

    Each sampler step maps x_t to x_prev = a·x_t + b·m(x_t, t) (`step_coefficients`); its inverse is
    x_t = (x_prev − b·m(x_t, t)) / a. Classic DDIM inversion (`refine=0`) evaluates the model at the
    known x_prev instead of the unknown x_t; `refine` fixed-point iterations re-evaluate it at the
    current estimate of x_t, which makes the map an exact inverse of the sampler (one model call
    each). Written in (a, b) the step needs no clean estimate from ε, so it is defined for
    v-prediction at zero terminal SNR, where ᾱ_T = 0 (there a = sqrt(1 − ᾱ_prev), b = −sqrt(ᾱ_prev)).
    """
    scheduler = _scheduler(backbone, steps)
    text = backbone.encode_text([prompt] * latents.shape[0])
    dtype = backbone.unet.dtype
    current = latents.float()
    timesteps = [int(t) for t in reversed(scheduler.timesteps)]
    for index, t in enumerate(timesteps):
        a, b = step_coefficients(scheduler, t)
        if abs(a) < 1e-6:
            raise ValueError(f"DDIM step at t = {t} of {steps} steps cannot be inverted (it discards the sample); "
                             "use more inversion steps")
        time = torch.full((current.shape[0],), t, device=current.device)
        estimate = current
        for _ in range(refine + 1):
            prediction = backbone.predict(estimate.to(dtype), time, text.to(dtype)).float()
            estimate = (current - b * prediction) / a
        current = estimate
        if on_step is not None:
            on_step(index + 1, len(timesteps))
    return current
