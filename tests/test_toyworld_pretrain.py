"""The pretraining recipe at a few steps: every stage, resume, recorded phases, export (CI never pretrains for real)."""

from __future__ import annotations

import json

import pytest
import torch

from motiondirector.backbones import load_backbone
from motiondirector.backbones.tiny import TinyModelConfig
from motiondirector.toyworld.pretrain import PretrainSettings, draw_timesteps, loss_weights, pretrain
from motiondirector.toyworld.render import world_words


def tiny_settings(**changes) -> PretrainSettings:
    model = TinyModelConfig(vae_channels=(8, 16, 16), words=world_words())
    return PretrainSettings(autoencoder_steps=2, autoencoder_batch=2, pool_seeds_per_scene=1, batch=2,
                            checkpoint_minutes=1e9, probe_minutes=1e9, model=model, **changes)


def test_draw_timesteps_puts_the_asked_share_in_the_noisy_half():
    generator = torch.Generator().manual_seed(0)
    timesteps = draw_timesteps(1000, 1000, 0.25, generator)
    assert timesteps.min() >= 0 and timesteps.max() < 1000
    assert (timesteps[:250] >= 500).all()
    assert 0.4 < (timesteps[250:] >= 500).float().mean() < 0.6  # the rest stays uniform
    uniform = draw_timesteps(1000, 1000, 0.0, generator)
    assert 0.4 < (uniform >= 500).float().mean() < 0.6


def test_loss_weights_are_min_snr_lifted_at_high_noise():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.arange(0, 1000, 7)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = loss_weights(scheduler, timesteps, min_snr_gamma=5.0, high_noise_weight=10.0)
    low, mid, high = snr > 5, (snr <= 1) & (snr >= 0.1), snr < 0.1
    assert low.any() and mid.any() and high.any()
    assert torch.allclose(weights[low], 5.0 / snr[low])  # min-SNR: the easy steps count less
    assert torch.allclose(weights[(snr > 1) & (snr <= 5)], torch.ones(1))
    assert torch.allclose(weights[mid], 1 / snr[mid])  # a flat weight on the clean-clip error
    assert torch.allclose(weights[high], torch.full((1,), 10.0))
    plain = loss_weights(scheduler, timesteps, min_snr_gamma=5.0, high_noise_weight=1.0)
    assert torch.allclose(plain[snr <= 5], torch.ones(1))


def test_pretrain_resumes_records_phases_and_exports_a_loadable_model(tmp_path):
    work, model = tmp_path / "work", tmp_path / "model"
    quiet = {"echo": lambda message: None, "export_to": model}
    first = pretrain(work, minutes=10, max_steps=2, settings=tiny_settings(high_noise_share=0.0), **quiet)
    assert first["denoiser_steps"] == 2
    assert [(p["first_step"], p["high_noise_share"]) for p in first["phases"]] == [(0, 0.0)]
    assert {"autoencoder.pt", "pool.pt", "checkpoint.pt", "pretrain.log"} <= {p.name for p in work.iterdir()}

    with pytest.raises(ValueError, match="--resume"):
        pretrain(work, minutes=10, max_steps=3, settings=tiny_settings(), **quiet)

    second = pretrain(work, minutes=10, resume=True, max_steps=4, settings=tiny_settings(high_noise_share=0.5), **quiet)
    assert second["denoiser_steps"] == 4
    assert [(p["first_step"], p["high_noise_share"]) for p in second["phases"]] == [(0, 0.0), (2, 0.5)]
    assert json.loads((model / "recipe.json").read_text())["phases"] == second["phases"]
    assert not model.with_name("model.staging").exists()

    backbone = load_backbone(str(model), "cpu")
    assert backbone.vae.config.scaling_factor == pytest.approx(second["latent_scaling_factor"])
    ema_unet = torch.load(work / "checkpoint.pt", weights_only=False)["ema"][0]
    exported = backbone.unet.state_dict()
    assert exported.keys() == ema_unet.keys()
    assert all(torch.equal(exported[name], ema_unet[name]) for name in exported)  # the export is the EMA
