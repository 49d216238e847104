"""One training step's randomness, forward and backward passes: the dual-path step of method.md.

All randomness of a draw comes from one CPU `torch.Generator`, drawn in a fixed order whatever the
mode, so a run is reproducible from (seed, generator state) and independent of the device. LoRA
dropout uses torch's global RNG, which the loop reseeds before every draw (train/ranks.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import CacheRecord
from motiondirector.lora.inject import Router
from motiondirector.losses import appearance_debiased_loss, spatial_loss, temporal_loss_org
from motiondirector.train.engine import AdapterGradients
from motiondirector.train.guard import TimestepSampler
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
              skip_probability: float, weights: torch.Tensor | None = None, *,
              timesteps: TimestepSampler | None = None) -> StepDraw:
    """Everything random about one step, always drawn in the same order.

    `weights` (one per record, e.g. an image's flipped copy drawn with the hflip probability) make
    the record draw non-uniform; None draws uniformly. `timesteps` draws t (e.g. with emphasis on
    high timesteps); None draws it uniformly from [0, num_timesteps).
    """
    def integer(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    record = integer(len(shapes)) if weights is None else int(torch.multinomial(weights, 1, generator=generator))
    shape = shapes[record]
    latent_noise = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    timestep = timesteps.draw(generator) if timesteps is not None else integer(num_timesteps)
    skip = bool(torch.rand((), generator=generator) < skip_probability)
    frames = shape[2]
    return StepDraw(record, latent_noise, noise, timestep, skip, frame=integer(frames), anchor=integer(frames))


@dataclass
class StepResult:
    grads: AdapterGradients  # per adapter, from its own loss, multiplied by the loss scale
    losses: dict[str, float]  # loss_spatial / loss_temporal / loss_org / loss_ad, those computed


def step_gradients(backbone: BackboneSpec, plan: AdapterPlan, router: Router,
                   groups: dict[str, list[nn.Parameter]], mode: str, clip: ClipTensors, draw: StepDraw, *,
                   ad_beta: float, loss_scale: float,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> StepResult:
    """Both paths' forward AND backward passes; no weight changes here (the engine steps afterwards).

    Each path differentiates inside its own routing context: gradient checkpointing recomputes the
    forward during the backward, and that recomputation must see the same active adapters and
    bypassed temporal layers. The spatial graph is also freed before the temporal forward.
    """
    device, dtype = clip.mean.device, backbone.unet.dtype
    latents = (clip.mean + clip.std * draw.latent_noise.to(device)) * backbone.latent_scaling_factor
    noise = draw.noise.to(device)
    timesteps = torch.tensor([draw.timestep], device=device, dtype=torch.long)
    noisy = backbone.scheduler.add_noise(latents, noise, timesteps)
    target = backbone.training_target(latents, noise, timesteps)
    text = clip.text.to(dtype)
    spatial = plan.spatial_for(draw.record)
    grads: AdapterGradients = {}
    losses: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def routed(adapters: list[str], spatial_path: bool = False) -> Iterator[None]:
        bypass = backbone.bypass_temporal() if spatial_path else contextlib.nullcontext()
        with router.active(adapters), bypass, autocast():
            yield

    def predict(sample: torch.Tensor) -> torch.Tensor:
        return backbone.predict(sample.to(dtype), timesteps, text)

    def differentiate(loss: torch.Tensor, adapters: list[str]) -> None:
        flat = list(torch.autograd.grad(loss * loss_scale, [p for a in adapters for p in groups[a]]))
        for adapter in adapters:
            grads[adapter], flat = flat[:len(groups[adapter])], flat[len(groups[adapter]):]

    if mode == "coupled":
        # The paper's baseline: one LoRA set in spatial and temporal layers, plain loss, all frames.
        with routed([spatial, TEMPORAL]):
            losses["loss_temporal"] = losses["loss_org"] = temporal_loss_org(predict(noisy), target)
            differentiate(losses["loss_org"], [spatial, TEMPORAL])
        return StepResult(grads, _floats(losses))

    run_spatial = mode == "spatial_only" or not draw.skip_spatial
    if run_spatial:
        frame = slice(draw.frame, draw.frame + 1)
        with routed([spatial], spatial_path=True):
            losses["loss_spatial"] = spatial_loss(predict(noisy[:, :, frame]), target[:, :, frame])
            differentiate(losses["loss_spatial"], [spatial])
    if mode != "spatial_only":
        # Spatial LoRA on at scale 1 while learning motion; off (scale 0) on spatial-skip steps.
        with routed([TEMPORAL, spatial] if run_spatial else [TEMPORAL]):
            prediction = predict(noisy)
            losses["loss_org"] = losses["loss_temporal"] = temporal_loss_org(prediction, target)
            if mode == "dual_path":
                losses["loss_ad"] = appearance_debiased_loss(prediction, target, draw.anchor, ad_beta)
                losses["loss_temporal"] = losses["loss_org"] + losses["loss_ad"]
            differentiate(losses["loss_temporal"], [TEMPORAL])
    return StepResult(grads, _floats(losses))


def _floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value.detach()) for key, value in sorted(losses.items())}
