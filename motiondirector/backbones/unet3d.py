"""ModelScope / ZeroScope family: diffusers `UNet3DConditionModel` + `AutoencoderKL` + CLIP text encoder.

Folder layout (diffusers format): unet/, vae/, text_encoder/, tokenizer/, scheduler/.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModel, CLIPTokenizer

from motiondirector.backbones.base import BackboneSpec, LatentDistribution, config_fingerprint

# Spatial transformers live in `*.attentions.*`, temporal ones in `transformer_in` and
# `*.temp_attentions.*` (method.md). Spatial LoRAs skip attn2 so text alignment is untouched.
_SPATIAL_LAYER_KEYS = ("attn1", "ff")
_TEMPORAL_LAYER_KEYS = ("attn1", "attn2", "ff")
# Encode/decode frames in chunks so a long clip does not need the whole VAE activation at once.
_VAE_CHUNK = 16


def _is_temporal_transformer(name: str) -> bool:
    return name == "transformer_in" or name.startswith("transformer_in.") or ".temp_attentions." in name


def _is_spatial_transformer(name: str) -> bool:
    return ".attentions." in name and not _is_temporal_transformer(name)


def lora_targets(unet: nn.Module, kind: str) -> list[str]:
    """Linear module names of `unet` that carry `kind` ('spatial' | 'temporal') LoRAs."""
    if kind == "spatial":
        in_block, keys = _is_spatial_transformer, _SPATIAL_LAYER_KEYS
    elif kind == "temporal":
        in_block, keys = _is_temporal_transformer, _TEMPORAL_LAYER_KEYS
    else:
        raise ValueError(f"LoRA kind must be 'spatial' or 'temporal', got {kind!r}")
    names = []
    wrapped: list[str] = []  # LoRA-wrapped Linears: their own inner Linears are not targets
    for name, module in unet.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, LoraLayer):
            wrapped.append(name)
        elif not isinstance(module, nn.Linear):
            continue
        if in_block(name) and any(key in name.split(".") for key in keys):
            names.append(name)
    return names


def _identity_transformer(hidden_states, *args, return_dict: bool = True, **kwargs):
    # TransformerTemporalModel adds its residual internally, so skipping it is the identity.
    return (hidden_states,) if not return_dict else TransformerTemporalModelOutput(sample=hidden_states)


def _identity_conv(hidden_states, *args, **kwargs):
    return hidden_states


class UNet3DSpec(BackboneSpec):
    family: ClassVar[str] = "unet3d"
    unet_class: ClassVar[str] = "UNet3DConditionModel"

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler, model_id: str):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler, self.model_id = tokenizer, scheduler, model_id
        self._bypassed = False
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    @classmethod
    def from_folder(cls, folder: Path, *, model_id: str, device: torch.device, dtype: torch.dtype) -> UNet3DSpec:
        unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        unet.set_attn_processor(AttnProcessor2_0())  # SDPA attention
        spec = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                   model_id=model_id)
        for module in spec.frozen_modules():
            module.to(device)
        return spec

    # --- identity -------------------------------------------------------------------------
    @property
    def architecture_fingerprint(self) -> str:
        return f"{self.unet_class}@{config_fingerprint(dict(self.unet.config))}"

    # --- encoders ---------------------------------------------------------------------------
    @property
    def latent_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> LatentDistribution:
        if frames.dtype == torch.uint8:
            frames = frames.float() / 255.0
        b, f, h, w, c = frames.shape
        pixels = frames.reshape(b * f, h, w, c).permute(0, 3, 1, 2) * 2.0 - 1.0
        pixels = pixels.to(self.device, self.vae.dtype)
        means, stds = [], []
        for chunk in pixels.split(_VAE_CHUNK):
            posterior = self.vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        mean, std = torch.cat(means), torch.cat(stds)

        def to_video(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

        return LatentDistribution(to_video(mean), to_video(std))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = latents.shape
        flat = (latents / self.latent_scaling_factor).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        flat = flat.to(self.vae.dtype)
        images = torch.cat([self.vae.decode(chunk).sample for chunk in flat.split(_VAE_CHUNK)])
        images = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        return images.reshape(b, f, *images.shape[1:]).permute(0, 1, 3, 4, 2)

    # --- denoiser ---------------------------------------------------------------------------
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]

    def spatial_lora_targets(self) -> list[str]:
        return lora_targets(self.unet, "spatial")

    def temporal_lora_targets(self) -> list[str]:
        return lora_targets(self.unet, "temporal")

    def _temporal_layers(self) -> Iterator[tuple[nn.Module, object]]:
        yield self.unet.transformer_in, _identity_transformer
        for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
            for layer in getattr(block, "temp_attentions", []):
                yield layer, _identity_transformer
            for layer in getattr(block, "temp_convs", []):
                yield layer, _identity_conv

    @contextlib.contextmanager
    def bypass_temporal(self) -> Iterator[None]:
        with self._temporal_bypass(True):
            yield

    @contextlib.contextmanager
    def _temporal_bypass(self, bypassed: bool) -> Iterator[None]:
        """Set the bypass to exactly `bypassed` inside the context, restoring the previous state after."""
        previous = self._bypassed
        self._set_bypass(bypassed)
        try:
            yield
        finally:
            self._set_bypass(previous)

    def _set_bypass(self, bypassed: bool) -> None:
        if bypassed == self._bypassed:
            return
        # An instance-level `forward` shadows the class method; deleting it restores the layer.
        for layer, identity in self._temporal_layers():
            if bypassed:
                layer.forward = identity
            else:
                del layer.forward
        self._bypassed = bypassed

    def enable_gradient_checkpointing(self) -> None:
        # diffusers does not support checkpointing for UNet3DConditionModel: wrap each block.
        for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
            if getattr(block, "_md_checkpointed", False):
                continue
            block.forward = self._checkpointed(block.forward)
            block._md_checkpointed = True

    def _checkpointed(self, forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            # The recompute runs during backward, after the forward's bypass context has exited:
            # replay it with the bypass state the forward saw.
            bypassed = self._bypassed

            def replay(*replay_args, **replay_kwargs):
                with self._temporal_bypass(bypassed):
                    return forward(*replay_args, **replay_kwargs)

            return checkpoint(replay, *args, use_reentrant=False, **kwargs)

        return run
