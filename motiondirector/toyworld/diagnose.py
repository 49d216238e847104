"""Does the base model's motion follow the words? The three probes of `motiondirector toyworld diagnose`.

(a) direction leak: a rendered clip noised to the first sampling timestep T, prompted with the
    opposite direction word -> share of clean-clip estimates (one denoiser call) and of finished
    samples (all steps from that noisy clip) that keep the clip's direction. A schedule whose last
    timestep keeps part of the clip lets the noisy input decide the motion instead of the text.
(b) direction accuracy: the base on left/right/up/down and grow/shrink prompts over seeds.
(c) steerability: a LoRA trained on one clip -> direction accuracy on its own training prompt,
    base vs LoRA from the same noise.
Plus the one-object probe (share of frames with exactly one object) over every sample drawn.
Direction: `probes.follows_direction` (slope sign along the motion's axis, at least 20% of the
reference's slope).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from motiondirector.backbones.base import BackboneSpec
from motiondirector.sample import SamplingSettings, sample_latents
from motiondirector.toyworld.evaluate import TOY_SAMPLING, format_cell, generate_scenes
from motiondirector.toyworld.probes import OPPOSITE, follows_direction, mean_ci, one_object_share, probe
from motiondirector.toyworld.render import BACKGROUNDS, OBJECT_COLOURS, SHAPES, Scene, render

LEAK_MOTIONS = ("left", "right", "up", "down")
ACCURACY_MOTIONS = ("left", "right", "up", "down", "grow", "shrink")
# Seeds of diagnose samples and clips: apart from the report's (< 10_000 by draw) and the pool's.
_SEED_OFFSET = 20_000


@dataclass(frozen=True)
class DiagnoseSettings:
    leak_clips: int = 32  # clips for (a), cycling through LEAK_MOTIONS
    seeds: int = 32  # seeds per motion for (b)
    steer_seeds: int = 32  # seeds for (c)
    steer_prompt: str = "a red circle moving right on a grey background"
    steer_mode: str = "dual_path"
    steer_steps: int = 300
    steer_rank: int = 16
    steer_lr: float = 1e-3
    seed: int = 0
    sampling: SamplingSettings = field(default_factory=lambda: TOY_SAMPLING)


def _random_appearance(rng: random.Random, motion: str) -> Scene:
    return Scene(rng.choice(list(OBJECT_COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)), motion)


def _share(hits: list[bool]) -> dict:
    mean, ci = mean_ci([float(h) for h in hits])
    return {"share": mean, "ci": ci, "n": len(hits)}


@torch.no_grad()
def direction_leak(backbone: BackboneSpec, settings: DiagnoseSettings) -> dict:
    """(a): noised clips at the first sampling timestep, prompted with the opposite direction."""
    from diffusers import DDIMScheduler

    rng = random.Random(settings.seed)
    sampling = settings.sampling
    size = (sampling.height, sampling.width)
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
    scheduler.set_timesteps(sampling.steps)
    first = scheduler.timesteps[0]
    clips = [render(_random_appearance(rng, LEAK_MOTIONS[i % len(LEAK_MOTIONS)]), frames=sampling.frames, size=size,
                    seed=_SEED_OFFSET + i) for i in range(settings.leak_clips)]
    frames = torch.stack([torch.from_numpy(c.frames) for c in clips])
    clean = backbone.encode_video(frames).mean.float() * backbone.latent_scaling_factor
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = scheduler.add_noise(clean.cpu(), noise, first.expand(len(clips)))
    prompts = [c.scene.replace(motion=OPPOSITE[c.scene.motion]).caption for c in clips]
    # The clean-clip estimate of the first sampling step (one guided denoiser call).
    estimates = _first_estimate(backbone, prompts, noisy, scheduler, sampling.guidance)
    samples = backbone.decode_latents(sample_latents(backbone, prompts, sampling, initial_noise=noisy)).cpu()
    decoded = backbone.decode_latents(estimates.to(backbone.device)).cpu()
    keep_estimate, keep_sample, follow_sample = [], [], []
    for clip, estimate, sample in zip(clips, decoded, samples, strict=True):
        motion = clip.scene.motion
        keep_estimate.append(follows_direction(probe(estimate).trajectory, clip.trajectory, motion))
        found = probe(sample).trajectory
        keep_sample.append(follows_direction(found, clip.trajectory, motion))
        follow_sample.append(not keep_sample[-1] and follows_direction(
            found, render(clip.scene.replace(motion=OPPOSITE[motion]), frames=sampling.frames, size=size,
                          seed=clip.seed).trajectory, OPPOSITE[motion]))
    alphas = backbone.scheduler.alphas_cumprod
    snr = float(alphas[int(first)] / (1 - alphas[int(first)])) if float(alphas[int(first)]) < 1 else float("inf")
    return {"timestep": int(first), "snr": snr, "keeps_clip_estimate": _share(keep_estimate),
            "keeps_clip_sample": _share(keep_sample), "follows_prompt_sample": _share(follow_sample),
            "one_object": _share_mean([one_object_share(s) for s in samples]), "samples": samples}


def _first_estimate(backbone: BackboneSpec, prompts: list[str], noisy: torch.Tensor, scheduler, guidance: float):
    """The guided prediction of the clean latents at the scheduler's first timestep."""
    t = scheduler.timesteps[0]
    text = torch.cat([backbone.encode_text([""] * len(prompts)), backbone.encode_text(prompts)])
    latents = noisy.to(backbone.device, torch.float32)
    model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(backbone.unet.dtype)
    prediction = backbone.predict(model_input, t.to(backbone.device).expand(model_input.shape[0]),
                                  text.to(backbone.unet.dtype)).float()
    uncond, cond = prediction.chunk(2)
    prediction = uncond + guidance * (cond - uncond)
    return scheduler.step(prediction, t, latents).pred_original_sample


def _share_mean(values: list[float]) -> dict:
    mean, ci = mean_ci(values)
    return {"share": mean, "ci": ci, "n": len(values)}


def _direction_scores(videos: torch.Tensor, scenes: list[Scene], seeds: list[int], sampling: SamplingSettings):
    hits, objects = [], []
    for video, scene, seed in zip(videos, scenes, seeds, strict=True):
        reference = render(scene, frames=sampling.frames, size=(sampling.height, sampling.width), seed=seed)
        hits.append(follows_direction(probe(video).trajectory, reference.trajectory, scene.motion))
        objects.append(one_object_share(video))
    return hits, objects


def direction_accuracy(backbone: BackboneSpec, settings: DiagnoseSettings) -> dict:
    """(b): per directional motion, the share of samples following the prompt's direction."""
    rng = random.Random(settings.seed + 1)
    scenes, seeds = [], []
    for motion in ACCURACY_MOTIONS:
        for index in range(settings.seeds):
            scenes.append(_random_appearance(rng, motion))
            seeds.append(_SEED_OFFSET + 1000 + index)
    videos = generate_scenes(backbone, scenes, seeds, settings.sampling)
    hits, objects = _direction_scores(videos, scenes, seeds, settings.sampling)
    per_motion = {m: _share([h for h, s in zip(hits, scenes, strict=True) if s.motion == m]) for m in ACCURACY_MOTIONS}
    return {"per_motion": per_motion, "all": _share(hits), "one_object": _share_mean(objects), "samples": videos}


def steerability(backbone: BackboneSpec, settings: DiagnoseSettings, out: Path) -> dict:
    """(c): a LoRA trained on one clip of `steer_prompt`; direction accuracy on that prompt, base vs LoRA."""
    from motiondirector.generate import composed
    from motiondirector.toyworld.benchmark import (
        BenchmarkSettings,
        _inference_choices,
        clip_records,
        train_config,
    )
    from motiondirector.toyworld.render import parse_caption
    from motiondirector.train.loop import train

    scene = parse_caption(settings.steer_prompt)
    if scene.motion not in OPPOSITE:
        raise ValueError(f"--steer-prompt {settings.steer_prompt!r}: needs a directional motion "
                         f"({', '.join(OPPOSITE)})")
    sampling = settings.sampling
    clip = render(scene, frames=sampling.frames, size=(sampling.height, sampling.width), seed=settings.seed)
    bench = BenchmarkSettings(motion=scene.motion, steps=settings.steer_steps, rank=settings.steer_rank,
                              lr=settings.steer_lr, seed=settings.seed, sampling=sampling)
    summary = train(train_config(bench, backbone, settings.steer_mode, 1, scene.caption), out / "steer-run",
                    overwrite=True, backbone=backbone, records=clip_records(backbone, [clip]), progress=False)
    seeds = [_SEED_OFFSET + 2000 + i for i in range(settings.steer_seeds)]
    scenes = [scene] * len(seeds)
    base = generate_scenes(backbone, scenes, seeds, sampling)
    with composed(backbone, _inference_choices(summary.packages, settings.steer_mode)):
        adapted = generate_scenes(backbone, scenes, seeds, sampling)
    rows = {}
    for label, videos in (("base", base), ("lora", adapted)):
        hits = [follows_direction(probe(v).trajectory, clip.trajectory, scene.motion) for v in videos]
        rows[label] = {"direction": _share(hits), "one_object": _share_mean([one_object_share(v) for v in videos])}
    return {"prompt": scene.caption, "mode": settings.steer_mode, "steps": settings.steer_steps,
            "train_seconds": round(summary.seconds, 1), **rows, "samples": {"base": base, "lora": adapted}}


def diagnose(backbone: BackboneSpec, settings: DiagnoseSettings, out: Path, *, probes: tuple[str, ...] = (
        "leak", "accuracy", "steer"), on_stage: Callable[[str], None] = print) -> dict:
    """Run the chosen probes; returns their results (video tensors under "samples" keys)."""
    scheduler = backbone.scheduler.config
    result: dict = {"model": backbone.model_id, "settings": {**asdict(settings), "sampling": asdict(settings.sampling)},
                    "scheduler": {k: scheduler.get(k) for k in ("prediction_type", "rescale_betas_zero_snr",
                                                                 "timestep_spacing")}}
    if "leak" in probes:
        on_stage("direction leak")
        result["leak"] = direction_leak(backbone, settings)
    if "accuracy" in probes:
        on_stage("direction accuracy")
        result["accuracy"] = direction_accuracy(backbone, settings)
    if "steer" in probes:
        on_stage("steerability (training a LoRA)")
        result["steer"] = steerability(backbone, settings, out)
    return result


def without_samples(result: dict) -> dict:
    """The result without its video tensors (for JSON)."""
    if isinstance(result, dict):
        return {k: without_samples(v) for k, v in result.items() if k != "samples"}
    return result


def _cell(entry: dict) -> str:
    return f"{format_cell((entry['share'], entry['ci']), True)} (n = {entry['n']})"


def diagnose_markdown(result: dict, command: str) -> str:
    """The diagnose tables as the markdown section of docs/toyworld.md."""
    sched = result["scheduler"]
    lines = [f"Command: `{command}`", "",
             f"Model `{result['model']}`: prediction `{sched['prediction_type']}`, zero terminal SNR "
             f"{sched['rescale_betas_zero_snr']}, `{sched['timestep_spacing']}` spacing; DDIM "
             f"{result['settings']['sampling']['steps']} steps, guidance {result['settings']['sampling']['guidance']}. "
             "Mean ± 95% CI.", ""]
    if "leak" in result:
        leak = result["leak"]
        lines += ["| (a) direction leak: noised clip at t = T, opposite direction word | share |", "|---|---|",
                  f"| first sampling timestep T (SNR) | {leak['timestep']} ({leak['snr']:.4f}) |",
                  f"| clean estimate at T keeps the clip's direction (target ≤ 60%) | "
                  f"{_cell(leak['keeps_clip_estimate'])} |",
                  f"| finished sample keeps the clip's direction (target ≤ 60%) | {_cell(leak['keeps_clip_sample'])} |",
                  f"| finished sample follows the prompt's direction | {_cell(leak['follows_prompt_sample'])} |",
                  f"| one object per frame | {_cell(leak['one_object'])} |", ""]
    if "accuracy" in result:
        acc = result["accuracy"]
        motions = list(acc["per_motion"])
        lines += ["(b) direction accuracy of the base (target ≥ 90%):", "",
                  "| " + " | ".join(motions) + " | all | one object per frame |", "|---" * (len(motions) + 2) + "|",
                  "| " + " | ".join(format_cell((acc["per_motion"][m]["share"], acc["per_motion"][m]["ci"]), True)
                                    for m in motions)
                  + f" | {_cell(acc['all'])} | {_cell(acc['one_object'])} |", ""]
    if "steer" in result:
        steer = result["steer"]
        lines += [f"(c) steerability: a `{steer['mode']}` LoRA trained {steer['steps']} steps on one clip of "
                  f"\"{steer['prompt']}\", sampled on that prompt from the same noise:", "",
                  "| model | direction accuracy | one object per frame |", "|---|---|---|",
                  f"| base | {_cell(steer['base']['direction'])} | {_cell(steer['base']['one_object'])} |",
                  f"| base + LoRA | {_cell(steer['lora']['direction'])} | {_cell(steer['lora']['one_object'])} |", ""]
    return "\n".join(lines)


def grid_rows(result: dict, per_row: int = 4) -> torch.Tensor | None:
    """A few samples of each probe, (rows * per_row, F, H, W, 3), for a png grid."""
    parts = []
    if "leak" in result:
        parts.append(result["leak"]["samples"][:per_row])
    if "accuracy" in result:
        parts.append(result["accuracy"]["samples"][::max(1, len(result["accuracy"]["samples"]) // per_row)][:per_row])
    if "steer" in result:
        parts += [result["steer"]["samples"]["base"][:per_row], result["steer"]["samples"]["lora"][:per_row]]
    parts = [p for p in parts if len(p) == per_row]
    return torch.cat(parts) if parts else None


def summary_numbers(result: dict) -> dict[str, float]:
    """The headline numbers (for tests and logs)."""
    numbers = {}
    if "leak" in result:
        numbers["leak_sample"] = result["leak"]["keeps_clip_sample"]["share"]
    if "accuracy" in result:
        numbers["accuracy"] = result["accuracy"]["all"]["share"]
    if "steer" in result:
        numbers["steer_base"] = result["steer"]["base"]["direction"]["share"]
        numbers["steer_lora"] = result["steer"]["lora"]["direction"]["share"]
    return {k: float(np.round(v, 4)) for k, v in numbers.items()}
