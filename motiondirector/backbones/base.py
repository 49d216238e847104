"""The backbone specification: everything the trainer and sampler need from a model family.

One subclass per family (finetrainers-style). The training loop, the sampler, LoRA injection and
the data encoders only talk to this interface, so adding a family is one new file in this folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from motiondirector.backbones.defaults import ModelDefaults


class ModelNotAvailableError(RuntimeError):
    """The base model cannot be found locally and cannot be downloaded."""


class ModelTooLargeError(RuntimeError):
    """The base model clearly cannot fit the requested device."""


@dataclass(frozen=True)
class LatentDistribution:
    """A VAE posterior over video latents, unscaled: (B, C, F, h, w) mean and std."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


def config_fingerprint(config: dict[str, Any]) -> str:
    """Stable short hash of a model config (keys starting with '_' are bookkeeping and ignored)."""
    clean = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    blob = json.dumps(clean, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class BackboneSpec(ABC):
    """A loaded video diffusion model plus the family-specific knowledge to train LoRAs on it.

    Components are frozen (requires_grad False). `model_id` names where the weights came from
    (a folder, a hub id or an embedded name) and goes into fingerprints and manifests.
    """

    family: ClassVar[str]
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    model_id: str
    defaults: ModelDefaults  # native frames, size, fps and sampling settings (backbones/defaults.py)

    # --- identity -------------------------------------------------------------------------
    @property
    @abstractmethod
    def architecture_fingerprint(self) -> str:
        """Hash of the denoiser's architecture config: LoRAs are only compatible within it."""

    @property
    def vae_id(self) -> str:
        return f"{self.model_id}/vae@{config_fingerprint(dict(self.vae.config))}"

    @property
    def text_encoder_id(self) -> str:
        return f"{self.model_id}/text_encoder@{config_fingerprint(self.text_encoder.config.to_dict())}"

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- encoders ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def latent_scaling_factor(self) -> float: ...

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> conditioning embeddings (B, L, D) on the model's device."""

    @abstractmethod
    def encode_video(self, frames: torch.Tensor) -> LatentDistribution:
        """Frames (B, F, H, W, 3) uint8 or float in [0, 1] -> unscaled latent distribution."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, F, h, w) -> frames (B, F, H, W, 3) float in [0, 1]."""

    # --- denoiser ---------------------------------------------------------------------------
    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The denoiser's raw output for (B, C, F, h, w) latents."""

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What `predict` should output: the noise (epsilon) or the velocity (v-prediction)."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")

    @abstractmethod
    def spatial_lora_targets(self) -> list[str]:
        """Names of the Linear modules that carry spatial (appearance) LoRAs."""

    @abstractmethod
    def temporal_lora_targets(self) -> list[str]:
        """Names of the Linear modules that carry temporal (motion) LoRAs."""

    @abstractmethod
    def bypass_temporal(self) -> contextlib.AbstractContextManager[None]:
        """Context in which every temporal layer is an identity (the spatial path)."""

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None: ...

    def frozen_modules(self) -> Iterator[nn.Module]:
        yield from (self.unet, self.vae, self.text_encoder)
