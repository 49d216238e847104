"""Pretraining recipe of the embedded `toy` base model (ZeroScope's architecture, toy-world scale).

Stages, each resumable from files in the work folder:
1. autoencoder (AutoencoderKL, 4x) on rendered frames -> `autoencoder.pt`;
2. a fixed pool of rendered clips of the pretraining motions, encoded once -> `pool.pt`;
3. UNet3D + CLIP text encoder trained jointly from scratch on the pool (epsilon prediction,
   min-SNR weighting, caption dropout for classifier-free guidance, EMA) -> `checkpoint.pt`,
   saved every few minutes, with a periodic sampled quality probe -> `probes.jsonl`;
then the EMA weights are exported as a diffusers folder (default: the embedded model folder).
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from motiondirector.backbones.tiny import TinyModelConfig, build_components, save_model_folder
from motiondirector.storage import atomic_write, staged_folder
from motiondirector.toyworld.render import (
    HELD_OUT_MOTION,
    MOTION_PHRASES,
    OBJECT_COLOURS,
    PRETRAIN_MOTIONS,
    Scene,
    all_scenes,
    render,
    world_words,
)

EMBEDDED_MODEL_FOLDER = Path(__file__).resolve().parent / "model"
FRAMES = 8
SIZE = 32


def toy_model_config() -> TinyModelConfig:
    """The toy model's sizes: 32x32x8 videos, 4x autoencoder (8x8 latents), ~2.9 M-param UNet."""
    return TinyModelConfig(block_out_channels=(48, 96), layers_per_block=1, attention_head_dim=8,
                           norm_num_groups=16, text_dim=64, text_layers=2, text_heads=4, max_tokens=16,
                           vae_channels=(16, 32, 64), latent_channels=4, sample_size=SIZE, words=world_words())


@dataclass(frozen=True)
class PretrainSettings:
    seed: int = 0
    autoencoder_steps: int = 1000
    autoencoder_batch: int = 12
    autoencoder_lr: float = 2e-3
    pool_seeds_per_scene: int = 12
    batch: int = 8
    lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # Share of each batch whose timesteps come from the noisier half of the schedule: that is where
    # a clip's layout and trajectory (the motion the text asks for) are decided.
    high_noise_share: float = 0.5
    # Cap of the extra loss weight 1/SNR where SNR < 1 (1 = none): see `loss_weights`.
    high_noise_weight: float = 10.0
    ema_decay: float = 0.999
    checkpoint_minutes: float = 4.0
    probe_minutes: float = 15.0
    probe_prompts: int = 12
    threads: int = 1
    model: TinyModelConfig = field(default_factory=toy_model_config)


def _atomic_torch_save(payload: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())  # the system's one temp-name-then-rename writer


def _log(folder: Path, message: str, echo: Callable[[str], None]) -> None:
    echo(message)
    with open(folder / "pretrain.log", "a") as handle:
        handle.write(f"{time.strftime('%H:%M:%S')} {message}\n")


# --- stage 1: autoencoder ------------------------------------------------------------------

def _frame_batch(rng: random.Random, frames: int, motions: tuple[str, ...]) -> torch.Tensor:
    """`frames` single frames, each from its own random clip (more variety per step than whole clips)."""
    scenes = all_scenes(motions)
    picked = [render(rng.choice(scenes), frames=FRAMES, size=SIZE, seed=rng.randrange(2**31)).frames[
        rng.randrange(FRAMES)] for _ in range(frames)]
    pixels = torch.from_numpy(np.stack(picked)).float() / 255.0
    return pixels.permute(0, 3, 1, 2) * 2.0 - 1.0


def train_autoencoder(vae, settings: PretrainSettings, log: Callable[[str], None],
                      on_step: Callable[[int, int], None]) -> float:
    """Reconstruction (MSE + L1) with a tiny KL term; returns the held-out PSNR in dB."""
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.autoencoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.autoencoder_lr,
                                                   total_steps=settings.autoencoder_steps, pct_start=0.05)
    vae.train()
    for step in range(settings.autoencoder_steps):
        pixels = _frame_batch(rng, settings.autoencoder_batch, PRETRAIN_MOTIONS)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        on_step(step + 1, settings.autoencoder_steps)
        if (step + 1) % 100 == 0:
            log(f"autoencoder step {step + 1}/{settings.autoencoder_steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        pixels = _frame_batch(random.Random(settings.seed + 1), 64, tuple(PRETRAIN_MOTIONS) + (HELD_OUT_MOTION,))
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (pixels + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# --- stage 2: latent pool ------------------------------------------------------------------

@torch.no_grad()
def build_pool(vae, settings: PretrainSettings, on_step: Callable[[int, int], None],
               motions: tuple[str, ...] = PRETRAIN_MOTIONS) -> dict:
    """Encode every scene of `motions` at several seeds; latents stay unscaled until training."""
    scenes = all_scenes(motions)
    items = [(index, seed) for index in range(len(scenes)) for seed in range(settings.pool_seeds_per_scene)]
    latents = []
    for done, (index, seed) in enumerate(items):
        # Pool seeds are offset so they never coincide with report/benchmark seeds (< 10_000).
        frames = render(scenes[index], frames=FRAMES, size=SIZE, seed=10_000 + seed).frames
        pixels = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 127.5 - 1.0
        latents.append(vae.encode(pixels).latent_dist.mean.permute(1, 0, 2, 3))
        on_step(done + 1, len(items))
    return {"latents": torch.stack(latents), "scene_index": torch.tensor([i for i, _ in items]),
            "captions": [s.caption for s in scenes]}


# --- stage 3: denoiser + text encoder --------------------------------------------------------

class _Ema:
    """Exponential moving average of parameters, warmed up so early steps are not frozen in."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]

    def update(self, modules: list[torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, module in zip(self.shadow, modules, strict=True):
                for target, source in zip(shadow.parameters(), module.parameters(), strict=True):
                    target.lerp_(source, 1.0 - decay)


class _DenoiserTraining:
    """What both stages train and checkpoint together: UNet + text encoder, their EMA, AdamW, the batch RNG."""

    def __init__(self, components: dict, *, lr: float, ema_decay: float, seed: int,
                 text_lr_scale: float = 1.0) -> None:
        self.components = components
        self.trained = [components["unet"], components["text_encoder"]]
        self.parameters = [p for module in self.trained for p in module.parameters()]
        # One group per module: the text encoder may learn faster (`lr_scale`, applied by _optimizer_step).
        self.text_lr_scale = text_lr_scale
        self.optimizer = torch.optim.AdamW(
            [{"params": list(module.parameters()), "lr_scale": scale}
             for module, scale in zip(self.trained, (1.0, text_lr_scale), strict=True)], lr=lr, weight_decay=1e-2)
        self.ema = _Ema(self.trained, ema_decay)
        self.rng = torch.Generator().manual_seed(seed)

    def save(self, path: Path, **stage: Any) -> None:
        """Checkpoint the weights, EMA, optimizer and RNG with the stage's own entries (step, phases, ...)."""
        _atomic_torch_save({"unet": self.trained[0].state_dict(), "text_encoder": self.trained[1].state_dict(),
                            "ema": [shadow.state_dict() for shadow in self.ema.shadow],
                            "optimizer": self.optimizer.state_dict(), "rng": self.rng.get_state(), **stage}, path)

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by `save`; returns the stage's own entries."""
        state = torch.load(path, weights_only=False)
        self.trained[0].load_state_dict(state.pop("unet"))
        self.trained[1].load_state_dict(state.pop("text_encoder"))
        for shadow, saved in zip(self.ema.shadow, state.pop("ema"), strict=True):
            shadow.load_state_dict(saved)
        optimizer = state.pop("optimizer")
        if len(optimizer["param_groups"]) == 1:  # a checkpoint from before the per-module groups
            group, unet_count = optimizer["param_groups"][0], len(list(self.trained[0].parameters()))
            optimizer["param_groups"] = [{**group, "params": group["params"][:unet_count]},
                                         {**group, "params": group["params"][unet_count:]}]
        self.optimizer.load_state_dict(optimizer)
        for group, scale in zip(self.optimizer.param_groups, (1.0, self.text_lr_scale), strict=True):
            group["lr_scale"] = scale  # this run's setting, not the checkpoint's
        self.rng.set_state(state.pop("rng"))
        return state

    def ema_components(self) -> dict:
        return {**self.components, "unet": self.ema.shadow[0], "text_encoder": self.ema.shadow[1]}


def loss_weights(scheduler, timesteps: torch.Tensor, min_snr_gamma: float,
                 high_noise_weight: float) -> torch.Tensor:
    """Per-sample weights of the epsilon loss: min-SNR, lifted by clamp(1/SNR, 1, high_noise_weight).

    Min-SNR down-weights the easy low-noise steps. The epsilon loss weighs an error of the clean
    clip by SNR, which is < 0.1 where the layout and trajectory are decided, so the motion the text
    asks for gets a tiny share of the gradient; the second factor makes that x0 weight flat down to
    SNR = 1/high_noise_weight.
    """
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=min_snr_gamma) / snr * torch.clamp(1 / snr, min=1.0, max=high_noise_weight)


def draw_timesteps(batch: int, train_timesteps: int, high_noise_share: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, except that the first `high_noise_share` of the batch comes from [T/2, T)."""
    timesteps = torch.randint(0, train_timesteps, (batch,), generator=generator)
    high = round(batch * high_noise_share)
    timesteps[:high] = torch.randint(train_timesteps // 2, train_timesteps, (high,), generator=generator)
    return timesteps


def _phase_settings(settings: PretrainSettings) -> dict:
    """The settings that may change when a run is resumed; each change starts a new recorded phase."""
    return {"threads": settings.threads, "batch": settings.batch, "lr": settings.lr,
            "high_noise_share": settings.high_noise_share, "high_noise_weight": settings.high_noise_weight}


def quality_probe(components: dict, prompts: list[Scene], seed: int, steps: int = 20,
                  guidance: float = 6.0) -> dict[str, float]:
    """Sample `prompts` with the current weights and score them with the analytic probes."""
    from motiondirector.backbones.unet3d import UNet3DSpec
    from motiondirector.sample import SamplingSettings, latent_shape, sample_videos
    from motiondirector.toyworld.probes import appearance_hits, mean_ci, motion_fidelity, probe

    backbone = UNet3DSpec(unet=copy.deepcopy(components["unet"]), vae=components["vae"],
                          text_encoder=copy.deepcopy(components["text_encoder"]),
                          tokenizer=components["tokenizer"], scheduler=components["scheduler"], model_id="toy")
    settings = SamplingSettings(steps=steps, guidance=guidance, frames=FRAMES, height=SIZE, width=SIZE)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent_shape(backbone, settings, len(prompts)), generator=generator)
    videos = sample_videos(backbone, [s.caption for s in prompts], settings, initial_noise=noise)
    scores: dict[str, list[float]] = {"colour": [], "shape": [], "background": [], "fidelity": []}
    for index, (scene, video) in enumerate(zip(prompts, videos, strict=True)):
        found = probe(video)
        for name, hit in appearance_hits(found, scene).items():
            scores[name].append(float(hit))
        reference = render(scene, frames=FRAMES, size=SIZE, seed=seed + index).trajectory
        scores["fidelity"].append(motion_fidelity(found.trajectory, reference))
    return {name: round(mean_ci(values)[0], 4) for name, values in scores.items()}


def _draw_batch(latents: torch.Tensor, scene_index: torch.Tensor, caption_ids: torch.Tensor, empty_id: int,
                settings, scheduler, rng: torch.Generator, clip_weights: torch.Tensor | None = None):
    """One training batch from the pool: clean latents, noise, timesteps, noisy latents, caption ids
    (a `caption_dropout` share of them emptied for classifier-free guidance). `clip_weights`: draw
    clips in proportion to them instead of uniformly."""
    if clip_weights is None:
        index = torch.randint(0, len(latents), (settings.batch,), generator=rng)
    else:
        index = torch.multinomial(clip_weights, settings.batch, replacement=True, generator=rng)
    clean = latents[index]
    ids = caption_ids[scene_index[index]]
    dropped = torch.rand(settings.batch, generator=rng) < settings.caption_dropout
    ids[dropped] = caption_ids[empty_id]
    noise = torch.randn(clean.shape, generator=rng)
    timesteps = draw_timesteps(settings.batch, scheduler.config.num_train_timesteps, settings.high_noise_share, rng)
    return clean, noise, timesteps, scheduler.add_noise(clean, noise, timesteps), ids


def _optimizer_step(loss: torch.Tensor, optimizer, parameters: list, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def _write_probe(out: Path, components: dict, scenes: list[Scene], step: int, seconds: float,
                 log: Callable[[str], None]) -> None:
    scores = quality_probe(components, scenes, seed=step)
    with open(out / "probes.jsonl", "a") as handle:
        handle.write(json.dumps({"step": step, "minutes": round(seconds / 60, 1), **scores}) + "\n")
    log(f"probe at step {step}: {scores}")


def _training_loop(step: int, seconds: float, *, minutes: float, max_steps: int | None,
                   train_step: Callable[[int], float], every: list[tuple[float, Callable[[int, float], None]]],
                   log: Callable[[str], None], progress: Callable[[str, int, int], None]) -> tuple[int, float]:
    """Call `train_step(step)` until `minutes` pass or `max_steps` is reached; each (period, callback)
    of `every` runs every `period` minutes with (step, training seconds). Returns (step, seconds)."""
    budget = minutes * 60
    session_start = time.time()
    last = [session_start] * len(every)
    losses: list[float] = []
    recent: list[float] = []  # step times since the last log line: this run's speed, not the stage average
    while time.time() - session_start < budget and (max_steps is None or step < max_steps):
        tick = time.time()
        losses.append(train_step(step))
        step += 1
        recent.append(time.time() - tick)
        seconds += recent[-1]
        progress("denoiser", int(time.time() - session_start), int(budget))
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} ({np.mean(recent):.2f} s/step)")
            recent.clear()
        for index, (period, callback) in enumerate(every):
            if time.time() - last[index] > period * 60:
                callback(step, seconds)
                last[index] = time.time()
    return step, seconds


def _components_from_state(settings: PretrainSettings, state: dict) -> dict:
    components = build_components(settings.model, settings.seed)
    components["vae"].load_state_dict(state["vae"])
    components["vae"].register_to_config(scaling_factor=state["scaling_factor"])
    components["vae"].eval()
    return components


def pretrain(out: Path, *, minutes: float, resume: bool = False, max_steps: int | None = None,
             export_to: Path | None = EMBEDDED_MODEL_FOLDER, settings: PretrainSettings | None = None,
             echo: Callable[[str], None] = print,
             on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run (or continue) the recipe for up to `minutes` of denoiser training; returns the recipe record."""
    settings = settings or PretrainSettings()
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise ValueError(f"{out} already holds a pretraining run ({checkpoint_path}); pass --resume to continue "
                         "it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    progress = on_progress or (lambda stage, done, total: None)

    def log(message: str) -> None:
        _log(out, message, echo)

    timings = {}
    ae_path = out / "autoencoder.pt"
    if ae_path.exists():
        ae_state = torch.load(ae_path, weights_only=True)
    else:
        started = time.time()
        vae = build_components(settings.model, settings.seed)["vae"]
        psnr = train_autoencoder(vae, settings, log, lambda d, t: progress("autoencoder", d, t))
        ae_state = {"vae": vae.state_dict(), "psnr": psnr, "seconds": time.time() - started}
        log(f"autoencoder done: held-out PSNR {psnr:.1f} dB in {ae_state['seconds'] / 60:.1f} min")
        ae_state["scaling_factor"] = 1.0  # set from the pool's statistics below
        _atomic_torch_save(ae_state, ae_path)
    pool_path = out / "pool.pt"
    components = _components_from_state(settings, ae_state)
    if pool_path.exists():
        pool = torch.load(pool_path, weights_only=True)
    else:
        started = time.time()
        pool = build_pool(components["vae"], settings, lambda d, t: progress("latent pool", d, t))
        # Scale latents to unit variance, the role of ZeroScope's 0.18215.
        pool["scaling_factor"] = float(1.0 / pool["latents"].std())
        pool["seconds"] = time.time() - started
        _atomic_torch_save(pool, pool_path)
        ae_state["scaling_factor"] = pool["scaling_factor"]
        _atomic_torch_save(ae_state, ae_path)
        log(f"pool: {len(pool['latents'])} clips, scaling factor {pool['scaling_factor']:.4f}, "
            f"{pool['seconds'] / 60:.1f} min")
    timings["autoencoder_minutes"] = round(ae_state["seconds"] / 60, 2)
    timings["pool_minutes"] = round(pool["seconds"] / 60, 2)
    components["vae"].register_to_config(scaling_factor=pool["scaling_factor"])
    latents = pool["latents"] * pool["scaling_factor"]
    tokenizer = components["tokenizer"]
    caption_ids = tokenizer(pool["captions"] + [""], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    empty_id = len(pool["captions"])

    unet, text_encoder, scheduler = components["unet"], components["text_encoder"], components["scheduler"]
    training = _DenoiserTraining(components, lr=settings.lr, ema_decay=settings.ema_decay, seed=settings.seed)
    trained, parameters, optimizer, ema, rng = (training.trained, training.parameters, training.optimizer,
                                                training.ema, training.rng)
    step, unet_seconds = 0, 0.0
    phases: list[dict] = []
    if checkpoint_path.exists():
        state = training.load(checkpoint_path)
        step, unet_seconds = state["step"], state["seconds"]
        # Checkpoints from before phases were recorded ran uniform timesteps at one thread.
        phases = state.get("phases") or [{"first_step": 0, "first_minute": 0.0, "threads": 1, "batch": settings.batch,
                                           "lr": settings.lr, "high_noise_share": 0.0}]
        for phase in phases:
            phase.setdefault("high_noise_weight", 1.0)  # phases before the setting existed ran without it
        log(f"resumed at step {step} ({unet_seconds / 60:.1f} min trained)")
    if not phases or {k: phases[-1][k] for k in _phase_settings(settings)} != _phase_settings(settings):
        phases.append({"first_step": step, "first_minute": round(unet_seconds / 60, 2), **_phase_settings(settings)})

    def save_checkpoint() -> None:
        training.save(checkpoint_path, step=step, seconds=unet_seconds, phases=phases)

    ema_components = training.ema_components

    probe_scenes = [all_scenes(PRETRAIN_MOTIONS)[i] for i in
                    torch.randperm(len(all_scenes(PRETRAIN_MOTIONS)), generator=torch.Generator().manual_seed(1))
                    [:settings.probe_prompts].tolist()]

    def train_step(step: int) -> float:
        clean, noise, timesteps, noisy, ids = _draw_batch(latents, pool["scene_index"], caption_ids, empty_id,
                                                          settings, scheduler, rng)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3, 4))
        loss = (per_sample * loss_weights(scheduler, timesteps, settings.min_snr_gamma,
                                          settings.high_noise_weight)).mean()
        _optimizer_step(loss, optimizer, parameters, settings.lr * min(1.0, (step + 1) / settings.warmup_steps))
        ema.update(trained, step + 1)
        return loss.item()

    def write_probe(step: int, seconds: float) -> None:
        _write_probe(out, ema_components(), probe_scenes, step, seconds, log)

    def save(step_now: int, seconds_now: float) -> None:
        nonlocal step, unet_seconds
        step, unet_seconds = step_now, seconds_now
        save_checkpoint()

    unet.train()
    text_encoder.train()
    step, unet_seconds = _training_loop(step, unet_seconds, minutes=minutes, max_steps=max_steps, train_step=train_step,
                                        every=[(settings.checkpoint_minutes, save), (settings.probe_minutes, write_probe)],
                                        log=log, progress=progress)
    save_checkpoint()
    recipe = {
        "builder": "motiondirector.toyworld.pretrain", "seed": settings.seed, "denoiser_steps": step,
        "held_out_motion": HELD_OUT_MOTION, "pretrain_motions": list(PRETRAIN_MOTIONS),
        "frames": FRAMES, "size": SIZE, "autoencoder_psnr_db": round(ae_state["psnr"], 2),
        "latent_scaling_factor": pool["scaling_factor"], "pool_clips": len(latents),
        "timings": {**timings, "denoiser_minutes": round(unet_seconds / 60, 2), "threads": settings.threads},
        "settings": {k: v for k, v in asdict(settings).items() if k != "model"}, "model": asdict(settings.model),
        "phases": phases,
    }
    if export_to is not None:
        export(ema_components(), Path(export_to), recipe)
        log(f"exported step {step} to {export_to}")
    return recipe


def export(components: dict, folder: Path, recipe: dict, extra: dict[str, dict] | None = None) -> Path:
    """Write the diffusers folder (plus `extra` JSON files) next to `folder`, then swap it in (never half-written)."""
    with staged_folder(folder, replace=True) as staging:
        save_model_folder(components, staging, recipe=recipe)
        for name, content in (extra or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
    return folder


# --- v2: zero-terminal-SNR, v-prediction continuation -----------------------------------------
# The shipped epsilon model read each clip's direction from the noisy input even at t = T (final
# SNR 0.0047), so direction words got no gradient (docs/toyworld.md, diagnosis). This stage
# continues training its weights with a schedule whose last timestep is pure noise, so at t = T only
# the text can supply the motion. It warm-starts from a model folder: the shipped v1 weights, or a
# v2 export when a run continues from what is committed and its optimizer checkpoint is gone.

MODEL_DEFAULTS = {"defaults": {"frames": FRAMES, "height": SIZE, "width": SIZE, "fps": 8, "steps": 20,
                               "guidance": 6.0}}
ZERO_SNR_STAGE = "zero-SNR v-prediction continuation"


def zero_snr_scheduler():
    """ZeroScope's DDIM class and betas, rescaled to zero terminal SNR, v-prediction, trailing spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, rescale_betas_zero_snr=True,
                         timestep_spacing="trailing", prediction_type="v_prediction")


@dataclass(frozen=True)
class ZeroSnrSettings:
    seed: int = 1
    pool_seeds_per_scene: int = 10
    batch: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    # v-loss weight min(1 + SNR, gamma) / (1 + SNR): 1 at SNR 0 (t = T), min-SNR-like at low noise.
    snr_gamma: float = 5.0
    high_noise_share: float = 0.5
    ema_decay: float = 0.999
    checkpoint_minutes: float = 4.0
    probe_minutes: float = 20.0
    probe_prompts: int = 16
    pool_motions: tuple[str, ...] = PRETRAIN_MOTIONS  # all of them; fewer only for tests
    # (motion, weight) pairs: draw that motion's clips `weight` times as often as the others (1); for the
    # direction words a run has not separated yet (docs/toyworld.md).
    motion_weights: tuple[tuple[str, float], ...] = ()
    # The text encoder's learning rate = lr × this: it must carry a direction word into the later tokens,
    # which the UNet attends to (docs/toyworld.md).
    text_lr_scale: float = 1.0
    # At a warm start, move the motion words' token embeddings until captions that differ only in the
    # motion are at least this far apart in the text encoder's output (L2; 0: off). The v1 text encoder
    # had learnt to ignore them (docs/toyworld.md); only those embedding rows change.
    separate_motion_words: float = 0.0
    # Also export the EMA weights every this many minutes while training (0: only at the end).
    export_minutes: float = 0.0
    threads: int = 2


def motion_clip_weights(scene_index: torch.Tensor, scenes: list[Scene],
                        motion_weights: tuple[tuple[str, float], ...]) -> torch.Tensor | None:
    """Per-clip draw weights from (motion, weight) pairs (others weigh 1); None when there are none."""
    if not motion_weights:
        return None
    weights = dict(motion_weights)
    unknown = sorted(set(weights) - {s.motion for s in scenes})
    if unknown or min(weights.values()) <= 0:
        raise ValueError(f"motion weights {weights}: expected positive weights of pool motions "
                         f"({', '.join(sorted({s.motion for s in scenes}))})"
                         + (f"; not in the pool: {', '.join(unknown)}" if unknown else ""))
    return torch.tensor([weights.get(scenes[i].motion, 1.0) for i in scene_index.tolist()], dtype=torch.float64)


def v_loss_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(1 + SNR, gamma) / (1 + SNR): finite at SNR = 0, down-weights the easy low-noise steps."""
    alphas = scheduler.alphas_cumprod[timesteps]
    one_plus_snr = 1.0 / (1.0 - alphas).clamp(min=1e-8)  # 1 + SNR = 1 / (1 - alpha_bar)
    return torch.clamp(one_plus_snr, max=gamma) / one_plus_snr


def load_model_components(folder: Path) -> dict:
    """A diffusers model folder as trainable components (float32, CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "unet" / "config.json").exists():
        raise FileNotFoundError(f"{folder}: not a model folder (no unet/config.json) to warm-start from")
    return {"unet": UNet3DConditionModel.from_pretrained(folder / "unet"),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            "scheduler": DDIMScheduler.from_pretrained(folder / "scheduler")}


@torch.no_grad()
def text_feature_gaps(text_encoder, tokenizer) -> dict[str, float]:
    """L2 distance of the text encoder's output for captions that differ in one word (motion vs colour)."""
    base = Scene("red", "square", "grey", "left")
    pairs = {"left/right": (base, base.replace(motion="right")),
             "up/down": (base.replace(motion="up"), base.replace(motion="down")),
             "grow/shrink": (base.replace(motion="grow"), base.replace(motion="shrink")),
             "red/blue": (base, base.replace(colour="blue"))}
    gaps = {}
    for name, (first, second) in pairs.items():
        ids = tokenizer([first.caption, second.caption], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        features = text_encoder(ids)[0]
        gaps[name] = round(float((features[0] - features[1]).norm()), 3)
    return gaps


def separate_motion_words(text_encoder, tokenizer, target_gap: float, *, steps: int = 300, lr: float = 0.01,
                          seed: int = 0) -> dict[str, dict[str, float]]:
    """Train only the token embeddings of the pretraining motion words so that every two captions that
    differ only in their motion get text features ≥ `target_gap` apart (a hinge on the L2 distance).

    The embeddings stay within the largest colour word's norm, and every other weight is untouched, so
    the features of colours, shapes and backgrounds move only through attention. Returns the
    `text_feature_gaps` before and after.
    """
    embedding = text_encoder.get_input_embeddings().weight
    embedding_name = next(name for name, p in text_encoder.named_parameters() if p is embedding)
    motion_word_ids = [tokenizer.convert_tokens_to_ids(MOTION_PHRASES[m].split()[-1] + "</w>") for m in PRETRAIN_MOTIONS]
    colour_ids = [tokenizer.convert_tokens_to_ids(c + "</w>") for c in OBJECT_COLOURS]
    max_norm = float(embedding.detach()[colour_ids].norm(dim=1).max())
    # One row per appearance: the captions of all pretraining motions with that appearance.
    appearances = all_scenes(PRETRAIN_MOTIONS[:1])
    captions = [[scene.replace(motion=m).caption for m in PRETRAIN_MOTIONS] for scene in appearances]
    ids = tokenizer(sum(captions, []), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.view(len(appearances), len(PRETRAIN_MOTIONS), -1)
    before = text_feature_gaps(text_encoder, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    rows = embedding[motion_word_ids].detach().clone()
    # A little noise breaks the tie of words with equal embeddings, which the symmetric hinge cannot.
    rows = (rows + 0.01 * max_norm * torch.randn(rows.shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([rows], lr=lr)
    others = ~torch.eye(len(PRETRAIN_MOTIONS), dtype=torch.bool)
    was_training = text_encoder.training
    text_encoder.eval()
    for _ in range(steps):
        batch = ids[torch.randint(len(appearances), (8,), generator=generator)]
        table = embedding.detach().index_put((torch.tensor(motion_word_ids),), rows)
        hidden = torch.func.functional_call(text_encoder, {embedding_name: table}, (batch.flatten(0, 1),))[0]
        hidden = hidden.view(*batch.shape[:2], -1)
        gaps = torch.cdist(hidden, hidden)[:, others]
        loss = torch.relu(target_gap - gaps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            rows.mul_(torch.clamp(max_norm / rows.norm(dim=1, keepdim=True), max=1.0))
    with torch.no_grad():
        embedding[motion_word_ids] = rows
    text_encoder.train(was_training)
    return {"before": before, "after": text_feature_gaps(text_encoder, tokenizer)}


def _stage_of(recipe: dict) -> dict | None:
    return next((s for s in recipe.get("stages", []) if s.get("name") == ZERO_SNR_STAGE), None)


def zero_snr_pretrain(out: Path, *, minutes: float, init: Path = EMBEDDED_MODEL_FOLDER, resume: bool = False,
                      max_steps: int | None = None, export_to: Path | None = EMBEDDED_MODEL_FOLDER,
                      settings: ZeroSnrSettings | None = None, echo: Callable[[str], None] = print,
                      on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Continue a model folder's weights on the zero-SNR v-prediction schedule for up to `minutes`.

    Resumes from `out/checkpoint.pt` when it exists (with --resume); otherwise warm-starts from
    `init` (a v1 model starts the stage at step 0; a v2 export continues its recorded step count with
    a fresh optimizer, recorded as a phase). `max_steps` counts steps of this stage. Returns the recipe.
    """
    settings = settings or ZeroSnrSettings()
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise ValueError(f"{out} already holds a pretraining run ({checkpoint_path}); pass --resume to continue "
                         "it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    progress = on_progress or (lambda stage, done, total: None)

    def log(message: str) -> None:
        _log(out, message, echo)

    init = Path(init)
    init_recipe_path = out / "init_recipe.json"
    if checkpoint_path.exists():
        init_recipe = json.loads(init_recipe_path.read_text())
    else:
        init_recipe = json.loads((init / "recipe.json").read_text()) if (init / "recipe.json").exists() else {}
        atomic_write(init_recipe_path, json.dumps(init_recipe, indent=2).encode())
    components = load_model_components(init)
    components["scheduler"] = zero_snr_scheduler()
    vae, unet, text_encoder, scheduler = (components[k] for k in ("vae", "unet", "text_encoder", "scheduler"))
    scaling = float(vae.config.scaling_factor)

    pool_path = out / "pool.pt"
    if pool_path.exists():
        pool = torch.load(pool_path, weights_only=True)
    else:
        started = time.time()
        pool = build_pool(vae, settings, lambda d, t: progress("latent pool", d, t), settings.pool_motions)
        pool["seconds"] = time.time() - started
        _atomic_torch_save(pool, pool_path)
        log(f"pool: {len(pool['latents'])} clips of {', '.join(settings.pool_motions)} in {pool['seconds'] / 60:.1f} min")
    latents = pool["latents"] * scaling
    tokenizer = components["tokenizer"]
    caption_ids = tokenizer(pool["captions"] + [""], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    empty_id = len(pool["captions"])
    clip_weights = motion_clip_weights(pool["scene_index"], all_scenes(settings.pool_motions), settings.motion_weights)

    # A warm start may first separate the motion words (before the EMA copies the text encoder).
    separation = (separate_motion_words(text_encoder, tokenizer, settings.separate_motion_words, seed=settings.seed)
                  if settings.separate_motion_words > 0 and not checkpoint_path.exists() else None)
    training = _DenoiserTraining(components, lr=settings.lr, ema_decay=settings.ema_decay, seed=settings.seed,
                                 text_lr_scale=settings.text_lr_scale)
    trained, parameters, optimizer, ema, rng = (training.trained, training.parameters, training.optimizer,
                                                training.ema, training.rng)
    previous = _stage_of(init_recipe)
    step, seconds = (previous["steps"], previous["minutes"] * 60) if previous else (0, 0.0)
    warmup_from = step
    phases: list[dict] = [dict(p) for p in previous["phases"]] if previous else []
    current = {"threads": settings.threads, "batch": settings.batch, "lr": settings.lr,
               "high_noise_share": settings.high_noise_share, "snr_gamma": settings.snr_gamma,
               "motion_weights": dict(settings.motion_weights), "text_lr_scale": settings.text_lr_scale,
               "separate_motion_words": settings.separate_motion_words}
    if checkpoint_path.exists():
        state = training.load(checkpoint_path)
        step, seconds, phases = state["step"], state["seconds"], state["phases"]
        warmup_from = state["warmup_from"]
        log(f"resumed at step {step} ({seconds / 60:.1f} min trained)")
        if {k: phases[-1].get(k) for k in current} != current:
            phases.append({"first_step": step, "first_minute": round(seconds / 60, 2), **current})
    else:
        start = "shipped epsilon weights" if previous is None else "exported EMA weights, fresh optimizer"
        phases.append({"first_step": step, "first_minute": round(seconds / 60, 2), "warm_start": start,
                       "init": "embedded toy" if init.resolve() == EMBEDDED_MODEL_FOLDER else init.name, **current})
        rng.manual_seed(settings.seed + step)  # a continued stage does not replay the batches it saw
        log(f"warm start from {init} ({start}) at stage step {step}")
        if separation:
            phases[-1]["motion_words_separated"] = separation
            log(f"separated the motion words' embeddings: text feature gaps {separation['before']} -> "
                f"{separation['after']}")
        warmup_from = step  # a fresh optimizer warms its learning rate up again

    def save_checkpoint() -> None:
        training.save(checkpoint_path, step=step, seconds=seconds, phases=phases, warmup_from=warmup_from)

    ema_components = training.ema_components

    scenes = all_scenes(PRETRAIN_MOTIONS)
    probe_scenes = [scenes[i] for i in torch.randperm(len(scenes), generator=torch.Generator().manual_seed(1))
                    [:settings.probe_prompts].tolist()]

    def export_now(snapshot: bool = False) -> dict:
        """Export the EMA weights; `snapshot` also keeps them as WORK/exports/step-N, so an earlier export
        that measures better than the last one can still be shipped (15 MB each)."""
        recipe = zero_snr_recipe(init_recipe, settings, step=step, seconds=seconds, phases=phases,
                                 pool_clips=len(latents), text_gaps=text_feature_gaps(ema.shadow[1], tokenizer))
        extra = {"motiondirector.json": MODEL_DEFAULTS}
        if export_to is not None:
            export(ema_components(), Path(export_to), recipe, extra=extra)
            log(f"exported stage step {step} to {export_to}; text feature gaps {recipe['stages'][-1]['text_feature_gaps_l2']}")
        if snapshot:
            export(ema_components(), out / "exports" / f"step-{step}", recipe, extra=extra)
        return recipe

    def train_step(step: int) -> float:
        clean, noise, timesteps, noisy, ids = _draw_batch(latents, pool["scene_index"], caption_ids, empty_id,
                                                          settings, scheduler, rng, clip_weights)
        target = scheduler.get_velocity(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3, 4))
        loss = (per_sample * v_loss_weights(scheduler, timesteps, settings.snr_gamma)).mean()
        _optimizer_step(loss, optimizer, parameters,
                        settings.lr * min(1.0, (step - warmup_from + 1) / settings.warmup_steps))
        ema.update(trained, step + 1)
        return loss.item()

    def write_probe(step_now: int, seconds_now: float) -> None:
        _write_probe(out, ema_components(), probe_scenes, step_now, seconds_now, log)

    def save_and_export(step_now: int, seconds_now: float) -> None:
        nonlocal step, seconds
        step, seconds = step_now, seconds_now
        save_checkpoint()
        export_now(snapshot=True)

    def save(step_now: int, seconds_now: float) -> None:
        nonlocal step, seconds
        step, seconds = step_now, seconds_now
        save_checkpoint()

    unet.train()
    text_encoder.train()
    step, seconds = _training_loop(step, seconds, minutes=minutes, max_steps=max_steps, train_step=train_step,
                                   every=[(settings.checkpoint_minutes, save), (settings.probe_minutes, write_probe),
                                          (settings.export_minutes or math.inf, save_and_export)],
                                   log=log, progress=progress)
    save_checkpoint()
    return export_now()


def zero_snr_recipe(init_recipe: dict, settings: ZeroSnrSettings, *, step: int, seconds: float, phases: list[dict],
                    pool_clips: int, text_gaps: dict[str, float]) -> dict:
    """recipe.json of a v2 model: the v1 from-scratch stage as recorded, then this stage."""
    stages = [s for s in init_recipe.get("stages", []) if s.get("name") != ZERO_SNR_STAGE]
    if not stages:  # a v1 recipe: its whole record is the first stage
        stages = [{"name": "epsilon pretraining from scratch", "steps": init_recipe.get("denoiser_steps"),
                   "minutes": init_recipe.get("timings", {}).get("denoiser_minutes"),
                   **{k: init_recipe[k] for k in ("timings", "settings", "phases", "pool_clips") if k in init_recipe}}]
    stage = {"name": ZERO_SNR_STAGE, "steps": step, "minutes": round(seconds / 60, 2),
             "trained": ["unet", "text_encoder"], "frozen": ["vae"], "pool_clips": pool_clips,
             "target": "scheduler.get_velocity(clean, noise, t)", "loss_weight": "min(1 + SNR, snr_gamma) / (1 + SNR)",
             "settings": asdict(settings), "phases": phases, "text_feature_gaps_l2": text_gaps}
    scheduler = zero_snr_scheduler().config
    return {
        "builder": "motiondirector.toyworld.pretrain", "seed": init_recipe.get("seed", 0),
        "denoiser_steps": sum(s["steps"] or 0 for s in stages) + step,
        "held_out_motion": HELD_OUT_MOTION, "pretrain_motions": list(PRETRAIN_MOTIONS), "frames": FRAMES,
        "size": SIZE, "autoencoder_psnr_db": init_recipe.get("autoencoder_psnr_db"),
        "latent_scaling_factor": init_recipe.get("latent_scaling_factor"),
        "scheduler": {k: scheduler[k] for k in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing",
                                                "beta_schedule", "beta_start", "beta_end")},
        "model": init_recipe.get("model"), "stages": [*stages, stage],
    }
