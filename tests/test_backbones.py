"""Backbone specification for UNet3D: loading, errors, encoders, and the spatial path's bypass."""

from __future__ import annotations

import json

import pytest
import torch

from motiondirector.backbones import (
    ModelNotAvailableError,
    ModelTooLargeError,
    check_fits,
    load_backbone,
    resolve_model_folder,
)


def _noisy_inputs(backbone, frames=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, 16, 16, generator=generator)
    text = backbone.encode_text(["a red car"])
    return latents, torch.tensor([500]), text


def test_loads_tiny_folder_with_frozen_components(tiny_backbone):
    assert tiny_backbone.family == "unet3d"
    assert tiny_backbone.architecture_fingerprint.startswith("UNet3DConditionModel@")
    for module in tiny_backbone.frozen_modules():
        assert not any(p.requires_grad for p in module.parameters())


def test_unknown_folder_and_hub_id_fail_with_how_to_provide(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="not a diffusers model folder"):
        resolve_model_folder(str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="huggingface-cli download"):
        resolve_model_folder("nobody/no-such-model")


def test_unsupported_denoiser_class_is_named(tiny_model_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    config_path = copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "UNet2DConditionModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailableError, match="UNet2DConditionModel.*not supported"):
        load_backbone(str(copy), "cpu")


def test_fit_check_refuses_with_an_estimate(tiny_model_dir, monkeypatch):
    import motiondirector.backbones as backbones

    monkeypatch.setattr(backbones, "_available_bytes", lambda device: 1024)
    with pytest.raises(ModelTooLargeError, match=r"GiB in torch.float32 but cpu has"):
        check_fits(tiny_model_dir, torch.device("cpu"), torch.float32)


def test_encoders_shapes_and_round_trip_ranges(tiny_backbone):
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    distribution = tiny_backbone.encode_video(frames)
    assert distribution.mean.shape == (2, 4, 3, 16, 16)
    assert (distribution.std > 0).all()
    decoded = tiny_backbone.decode_latents(distribution.mean * tiny_backbone.latent_scaling_factor)
    assert decoded.shape == (2, 3, 32, 32, 3)
    assert decoded.min() >= 0 and decoded.max() <= 1
    text = tiny_backbone.encode_text(["a car", "a person riding a bicycle"])
    assert text.shape == (2, tiny_backbone.tokenizer.model_max_length, 32)


def test_spatial_path_ignores_temporal_weights(tiny_backbone):
    latents, t, text = _noisy_inputs(tiny_backbone)
    with tiny_backbone.bypass_temporal():
        before = tiny_backbone.predict(latents, t, text)
    full_before = tiny_backbone.predict(latents, t, text)
    with torch.no_grad():
        for name, parameter in tiny_backbone.unet.named_parameters():
            if "temp_" in name or name.startswith("transformer_in"):
                parameter.add_(torch.randn_like(parameter))
    with tiny_backbone.bypass_temporal():
        after = tiny_backbone.predict(latents, t, text)
    full_after = tiny_backbone.predict(latents, t, text)
    torch.testing.assert_close(before, after)
    # The same perturbation does change the full (temporal) path, so the check above can fail.
    assert (full_before - full_after).abs().max() > 1e-3


def test_spatial_path_frames_are_independent(tiny_backbone):
    latents, t, text = _noisy_inputs(tiny_backbone, frames=4)
    with tiny_backbone.bypass_temporal():
        together = tiny_backbone.predict(latents, t, text)
        alone = torch.cat([tiny_backbone.predict(latents[:, :, i:i + 1], t, text) for i in range(4)], dim=2)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    # Without the bypass, frames interact (temporal attention/convs), so the equality is not trivial.
    together_full = tiny_backbone.predict(latents, t, text)
    alone_full = torch.cat([tiny_backbone.predict(latents[:, :, i:i + 1], t, text) for i in range(4)], dim=2)
    assert (together_full - alone_full).abs().max() > 1e-3


def test_bypass_is_restored_after_the_context(tiny_backbone):
    latents, t, text = _noisy_inputs(tiny_backbone)
    reference = tiny_backbone.predict(latents, t, text)
    with tiny_backbone.bypass_temporal():
        pass
    torch.testing.assert_close(tiny_backbone.predict(latents, t, text), reference)


def test_gradient_checkpointing_keeps_outputs_and_gradients(tiny_backbone):
    latents, t, text = _noisy_inputs(tiny_backbone)
    weight = tiny_backbone.unet.down_blocks[0].attentions[0].proj_in.weight  # inside a checkpointed block
    weight.requires_grad_(True)
    out = tiny_backbone.predict(latents, t, text)
    (grad,) = torch.autograd.grad(out.square().mean(), weight)
    tiny_backbone.enable_gradient_checkpointing()
    out_ckpt = tiny_backbone.predict(latents, t, text)
    (grad_ckpt,) = torch.autograd.grad(out_ckpt.square().mean(), weight)
    torch.testing.assert_close(out, out_ckpt)
    torch.testing.assert_close(grad, grad_ckpt)


def test_gradient_checkpointing_replays_the_spatial_bypass_in_backward(tiny_backbone):
    # The recompute happens during backward, outside the bypass context: it must still bypass.
    from motiondirector.lora.inject import LoraSettings, activate, adapter_parameters, add_adapter

    unet = tiny_backbone.unet
    add_adapter(unet, "spatial", tiny_backbone.spatial_lora_targets(), LoraSettings(rank=4, dropout=0.1), seed=0)
    activate(unet, ["spatial"])
    unet.train()
    params = adapter_parameters(unet, "spatial")
    latents, t, text = _noisy_inputs(tiny_backbone, frames=1)

    def spatial_gradients():
        torch.manual_seed(0)  # the same LoRA dropout masks in both runs
        with tiny_backbone.bypass_temporal():
            loss = tiny_backbone.predict(latents, t, text).square().mean()
        return torch.autograd.grad(loss, params)

    plain = spatial_gradients()
    tiny_backbone.enable_gradient_checkpointing()
    checkpointed = spatial_gradients()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)
