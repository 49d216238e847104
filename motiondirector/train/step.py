"""One training step's randomness and forward passes: the dual-path step of method.md.

All randomness of a step comes from one CPU `torch.Generator`, drawn in a fixed order whatever the
mode, so a run is reproducible from (seed, generator state) and independent of the device. LoRA
dropout uses torch's global RNG, which the loop seeds and checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import CacheRecord
from motiondirector.lora.inject import Router
from motiondirector.losses import appearance_debiased_loss, spatial_loss, temporal_loss_org
from motiondirector.train.plan import TEMPORAL, AdapterPlan


@dataclass(frozen=True)
class ClipTensors:
    """A cache record as tensors on the training device (latents unscaled, fp32)."""

    mean: torch.Tensor  # (1, C, F, h, w)
    std: torch.Tensor
    text: torch.Tensor  # (1, L, D)


def clip_tensors(record: CacheRecord, device: torch.device) -> ClipTensors:
    def tensor(array) -> torch.Tensor:
        return torch.from_numpy(array).to(device=device, dtype=torch.float32).unsqueeze(0)

    return ClipTensors(tensor(record.latent_mean), tensor(record.latent_std), tensor(record.text_embedding))


@dataclass(frozen=True)
class StepDraw:
    record: int
    latent_noise: torch.Tensor  # samples the latent distribution: mean + std · latent_noise
    noise: torch.Tensor  # the diffusion noise ε
    timestep: int
    skip_spatial: bool
    frame: int  # the spatial path's frame
    anchor: int  # the appearance-debiased loss's anchor frame, drawn independently


def draw_step(generator: torch.Generator, shapes: list[tuple[int, ...]], num_timesteps: int,
              skip_probability: float) -> StepDraw:
    """Everything random about one step, always drawn in the same order."""
    def integer(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    record = integer(len(shapes))
    shape = shapes[record]
    latent_noise = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timestep = integer(num_timesteps)
    skip = bool(torch.rand((), generator=generator) < skip_probability)
    frames = shape[2]
    return StepDraw(record, latent_noise, noise, timestep, skip, frame=integer(frames), anchor=integer(frames))


@dataclass
class StepLosses:
    """Loss per adapter for the engine, plus the numbers worth logging."""

    by_adapter: dict[str, torch.Tensor]
    spatial: torch.Tensor | None = None
    temporal: torch.Tensor | None = None
    org: torch.Tensor | None = None
    ad: torch.Tensor | None = None

    def scalars(self) -> dict[str, float]:
        named = {"loss_spatial": self.spatial, "loss_temporal": self.temporal, "loss_org": self.org,
                 "loss_ad": self.ad}
        return {key: float(value.detach()) for key, value in named.items() if value is not None}


def step_losses(backbone: BackboneSpec, plan: AdapterPlan, router: Router, mode: str, clip: ClipTensors,
                draw: StepDraw, *, ad_beta: float,
                autocast: Callable[[], contextlib.AbstractContextManager]) -> StepLosses:
    """Forward passes of one step under the mode's routing (`router` over the backbone's UNet);
    no gradients are taken here."""
    device, dtype = clip.mean.device, backbone.unet.dtype
    latents = (clip.mean + clip.std * draw.latent_noise.to(device)) * backbone.latent_scaling_factor
    noise = draw.noise.to(device)
    timesteps = torch.tensor([draw.timestep], device=device, dtype=torch.long)
    noisy = backbone.scheduler.add_noise(latents, noise, timesteps)
    target = backbone.training_target(latents, noise, timesteps)
    text = clip.text.to(dtype)
    spatial = plan.spatial_for(draw.record)

    def predict(sample: torch.Tensor, adapters: list[str], spatial_path: bool = False) -> torch.Tensor:
        bypass = backbone.bypass_temporal() if spatial_path else contextlib.nullcontext()
        with router.active(adapters), bypass, autocast():
            return backbone.predict(sample.to(dtype), timesteps, text)

    if mode == "coupled":
        # The paper's baseline: one LoRA set in spatial and temporal layers, plain loss, all frames.
        loss = temporal_loss_org(predict(noisy, [spatial, TEMPORAL]), target)
        return StepLosses({spatial: loss, TEMPORAL: loss}, temporal=loss, org=loss)

    result = StepLosses({})
    run_spatial = mode == "spatial_only" or not draw.skip_spatial
    if run_spatial:
        frame = slice(draw.frame, draw.frame + 1)
        result.spatial = spatial_loss(predict(noisy[:, :, frame], [spatial], spatial_path=True),
                                      target[:, :, frame])
        result.by_adapter[spatial] = result.spatial
    if mode != "spatial_only":
        # Spatial LoRA on at scale 1 while learning motion; off (scale 0) on spatial-skip steps.
        prediction = predict(noisy, [TEMPORAL, spatial] if run_spatial else [TEMPORAL])
        result.org = temporal_loss_org(prediction, target)
        result.temporal = result.org
        if mode == "dual_path":
            result.ad = appearance_debiased_loss(prediction, target, draw.anchor, ad_beta)
            result.temporal = result.org + result.ad
        result.by_adapter[TEMPORAL] = result.temporal
    return result
