"""v-prediction, zero-terminal-SNR and trailing-spacing bases: sampler, inversion and training target.

The reference is diffusers' own `TextToVideoSDPipeline` on the same tiny model folder, scheduler,
prompt embeddings and initial noise. Inversion is checked by sampling its result back: on a random
tiny model that measures how exactly `ddim_invert` inverts the sampler's map, not image quality.
"""

from __future__ import annotations

import math

import pytest
import torch

from motiondirector.backbones.tiny import TinyModelConfig, write_tiny_model
from motiondirector.sample import (
    SamplingSettings,
    _scheduler,
    ddim_invert,
    rescale_guidance,
    sample_latents,
    step_coefficients,
)

ZERO_SNR_V = TinyModelConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing")
PROMPTS = ["a red car moving", "a dog running on the road"]
FRAMES, LATENT = 4, 8  # 4 frames of 16x16 pixels: 8x8 latents with the tiny 2x autoencoder


@pytest.fixture(scope="module")
def vpred_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-vpred"), ZERO_SNR_V, seed=0)


@pytest.fixture()
def vpred(vpred_dir):
    from motiondirector.backbones import load_backbone

    return load_backbone(str(vpred_dir), "cpu")


def _noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _settings(steps: int, guidance: float, **extra) -> SamplingSettings:
    return SamplingSettings(steps=steps, guidance=guidance, frames=FRAMES, height=2 * LATENT, width=2 * LATENT,
                            **extra)


def _moving_blob() -> torch.Tensor:
    """A clean latent clip of unit scale (a blob moving right, a signed pattern per channel)."""
    ys, xs = torch.meshgrid(torch.arange(LATENT).float(), torch.arange(LATENT).float(), indexing="ij")
    frames = [torch.exp(-((xs - 1.5 - 1.5 * f) ** 2 + (ys - 3.5) ** 2) / 4) for f in range(FRAMES)]
    clip = torch.stack([torch.stack(frames) * (1 if c % 2 else -1) * (1 + 0.3 * c) for c in range(4)])
    return clip.unsqueeze(0)


def _relative_error(reconstruction: torch.Tensor, clip: torch.Tensor) -> float:
    return float((reconstruction - clip).norm() / clip.norm())


def test_tiny_model_carries_the_zero_snr_schedule(vpred):
    config = vpred.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    assert float(vpred.scheduler.alphas_cumprod[-1]) == 0.0
    assert int(_scheduler(vpred, 10).timesteps[0]) == 999  # trailing: the first step is at SNR 0


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_equals_diffusers_pipeline(vpred, vpred_dir, guidance):
    from diffusers import TextToVideoSDPipeline

    noise = _noise(len(PROMPTS))
    ours = sample_latents(vpred, PROMPTS, _settings(10, guidance), initial_noise=noise)
    pipeline = TextToVideoSDPipeline.from_pretrained(str(vpred_dir))
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(prompt_embeds=vpred.encode_text(PROMPTS), negative_prompt_embeds=vpred.encode_text([""] * 2),
                      latents=noise.clone(), num_inference_steps=10, guidance_scale=guidance, num_frames=FRAMES,
                      height=2 * LATENT, width=2 * LATENT, output_type="latent").frames
    assert theirs.shape == ours.shape and torch.isfinite(ours).all()
    # The same float32 operations in the same order: equal to rounding (measured: bit-identical).
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert float(ours.std()) > 0.1  # not a degenerate all-zero output


def test_guidance_rescale_matches_the_papers_formula(vpred):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    generator = torch.Generator().manual_seed(3)
    conditional, unconditional = torch.randn(2, 4, 3, 5, 5, generator=generator), torch.randn(2, 4, 3, 5, 5,
                                                                                                 generator=generator)
    guided = unconditional + 7.0 * (conditional - unconditional)
    for factor in (0.0, 0.7, 1.0):
        expected = rescale_noise_cfg(guided.clone(), conditional, guidance_rescale=factor)
        assert torch.allclose(rescale_guidance(guided, conditional, factor), expected, atol=1e-6)
    full = rescale_guidance(guided, conditional, 1.0)
    assert torch.allclose(full[0].std(), conditional[0].std(), atol=1e-5)  # per video
    # In the sampler: 0 leaves the output unchanged, 0.7 changes it.
    noise = _noise(1)
    plain = sample_latents(vpred, PROMPTS[:1], _settings(4, 7.0), initial_noise=noise)
    assert torch.equal(plain, sample_latents(vpred, PROMPTS[:1], _settings(4, 7.0, guidance_rescale=0.0),
                                             initial_noise=noise))
    rescaled = sample_latents(vpred, PROMPTS[:1], _settings(4, 7.0, guidance_rescale=0.7), initial_noise=noise)
    assert float((rescaled - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_step_coefficients_are_the_schedulers_step(prediction_type, spacing):
    from diffusers import DDIMScheduler

    zero_snr = prediction_type != "epsilon"
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                              rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing)
    scheduler.set_timesteps(30)  # 1000 / 30 is not whole: trailing steps are uneven
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps.tolist():
        a, b = step_coefficients(scheduler, t)
        sample, output = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
        expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
        assert torch.allclose(a * sample + b * output, expected, atol=1e-5), (t, a, b)
        if prediction_type == "v_prediction":
            assert math.isclose(a * a + b * b, 1.0, abs_tol=1e-5)  # a v-prediction DDIM step is a rotation


def test_inversion_then_sampling_reconstructs_the_clip_v_prediction(vpred):
    """Unguided, same prompt. Classic inversion (the model evaluated at the known sample) errs by
    O(1/steps); fixed-point refinement makes it the sampler's exact inverse."""
    clip = _moving_blob()
    errors = {}
    for steps, refine in ((10, 0), (20, 0), (10, 4)):
        noise = ddim_invert(vpred, clip, steps=steps, prompt=PROMPTS[0], refine=refine)
        assert torch.isfinite(noise).all()
        back = sample_latents(vpred, PROMPTS[:1], _settings(steps, 1.0), initial_noise=noise)
        errors[steps, refine] = _relative_error(back, clip)
    # Measured: 0.105, 0.05 and 2.6e-4 (relative L2 error of the reconstructed latents).
    assert errors[10, 0] < 0.2
    assert errors[20, 0] < 0.65 * errors[10, 0]
    assert errors[10, 4] < 2e-3


def test_inversion_of_an_epsilon_model_is_the_textbook_formula(tiny_backbone):
    """On the ModelScope schedule (ε, leading) refine=0 is the classic ε DDIM inversion, written out here."""
    clip = _moving_blob()
    steps = 5
    scheduler = _scheduler(tiny_backbone, steps)
    text = tiny_backbone.encode_text([""])
    alphas = scheduler.alphas_cumprod
    current = clip
    for t in reversed(scheduler.timesteps.tolist()):
        previous = t - 1000 // steps
        alpha_prev = alphas[previous] if previous >= 0 else scheduler.final_alpha_cumprod
        eps = tiny_backbone.predict(current, torch.tensor([t]), text)
        clean = (current - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
        current = alphas[t].sqrt() * clean + (1 - alphas[t]).sqrt() * eps
    assert torch.allclose(ddim_invert(tiny_backbone, clip, steps=steps), current, atol=1e-4)
    # And refinement inverts the ε sampler too.
    noise = ddim_invert(tiny_backbone, clip, steps=10, prompt=PROMPTS[0], refine=4)
    back = sample_latents(tiny_backbone, PROMPTS[:1], _settings(10, 1.0), initial_noise=noise)
    assert _relative_error(back, clip) < 0.05  # measured 0.021


def test_epsilon_model_at_zero_terminal_snr_is_refused(tmp_path):
    from motiondirector.backbones import load_backbone

    config = TinyModelConfig(prediction_type="epsilon", zero_terminal_snr=True, timestep_spacing="trailing")
    backbone = load_backbone(str(write_tiny_model(tmp_path / "eps-zero-snr", config)), "cpu")
    with pytest.raises(ValueError, match="v_prediction"):
        sample_latents(backbone, PROMPTS[:1], _settings(2, 1.0), initial_noise=_noise(1))


def test_training_target_and_losses_are_finite_at_snr_zero(vpred):
    """At t = T the v target is −x0 (the clip itself); the AD loss then compares debiased clips."""
    from motiondirector.losses import appearance_debiased_loss, temporal_loss_org

    clip, noise = _moving_blob(), _noise(1)
    last = torch.tensor([999])
    target = vpred.training_target(clip, noise, last)
    assert torch.allclose(target, -clip, atol=1e-6)
    noisy = vpred.scheduler.add_noise(clip, noise, last)
    assert torch.allclose(noisy, noise, atol=1e-6)  # nothing of the clip is left in the input
    prediction = vpred.predict(noisy, last, vpred.encode_text([PROMPTS[0]]))
    for loss in (temporal_loss_org(prediction, target), appearance_debiased_loss(prediction, target, 0)):
        assert torch.isfinite(loss) and float(loss) > 0


def test_generate_takes_guidance_rescale_into_the_sidecar(vpred_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from motiondirector.cli import app

    pngs = {}
    for factor in ("0", "0.7"):
        out = tmp_path / factor
        result = CliRunner().invoke(app, ["generate", "--base", str(vpred_dir), "--prompt", "a red car", "--steps", "3",
                                          "--guidance", "7", "--guidance-rescale", factor, "--frames", "4", "--size",
                                          "16x16", "--seed", "1", "--device", "cpu", "--out", str(out)])
        assert result.exit_code == 0, result.output
        sidecar = json.loads(next(out.glob("*.json")).read_text())
        assert sidecar["params"]["guidance_rescale"] == float(factor)
        pngs[factor] = next(out.glob("*.png")).read_bytes()
    assert pngs["0"] != pngs["0.7"]
