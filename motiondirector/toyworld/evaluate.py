"""Sampling toy-world prompts in batches and scoring them with the probes; the base-model quality report."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from motiondirector.backbones.base import BackboneSpec
from motiondirector.sample import SamplingSettings, sample_videos
from motiondirector.toyworld.probes import (
    ATTRIBUTES,
    appearance_hits,
    leakage_hits,
    mean_ci,
    motion_fidelity,
    motion_scores,
    one_object_share,
    probe,
)
from motiondirector.toyworld.render import HELD_OUT_MOTION, PRETRAIN_MOTIONS, Scene, all_scenes, render

# The toy model's sampling defaults: 32x32 px, 8 frames, 20 DDIM steps, moderate guidance.
TOY_SAMPLING = SamplingSettings(steps=20, guidance=6.0, frames=8, height=32, width=32)


@dataclass(frozen=True)
class Sample:
    """One generated video with what was asked and what the probes found."""

    asked: Scene
    seed: int
    frames: torch.Tensor  # (F, H, W, 3) float in [0, 1]
    scores: dict[str, float | bool | None]


def generate_scenes(backbone: BackboneSpec, scenes: Sequence[Scene], seeds: Sequence[int],
                    settings: SamplingSettings = TOY_SAMPLING, *, batch: int = 16,
                    on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Sample each scene's caption from the initial noise of its seed: (N, F, H, W, 3) in [0, 1].

    The noise of a seed does not depend on the batch or the model's LoRAs, so every mode of the
    benchmark starts from the same noise (as the paper compares).
    """
    from motiondirector.noise_prior import initial_noise

    videos = []
    for start in range(0, len(scenes), batch):
        chunk = range(start, min(start + batch, len(scenes)))
        noise = torch.cat([initial_noise(backbone, settings, seeds[i]) for i in chunk])
        videos.append(sample_videos(backbone, [scenes[i].caption for i in chunk], settings, initial_noise=noise).cpu())
        if on_batch is not None:
            on_batch(chunk.stop, len(scenes))
    return torch.cat(videos)


def score_sample(frames: torch.Tensor, asked: Scene, seed: int, reference: Scene | None = None,
                 reference_trajectory: np.ndarray | None = None) -> dict[str, float | bool | None]:
    """Appearance hits per attribute, motion scores, the share of frames with exactly one object, and
    (with a reference scene) leakage per attribute.

    Motion compares with `reference_trajectory`, or else with a ground-truth render of `asked`:
    `fidelity` is the mean correlation over the moving signals; `motion_scores` adds the per-axis
    correlations, the distinctive component and `motion_fidelity`, which weighs it (probes.py).
    """
    found = probe(frames)
    if reference_trajectory is None:
        reference_trajectory = render(asked, frames=frames.shape[0], size=tuple(frames.shape[1:3]),
                                      seed=seed).trajectory
    scores: dict[str, float | bool | None] = dict(appearance_hits(found, asked))
    scores["fidelity"] = motion_fidelity(found.trajectory, reference_trajectory)
    scores.update(motion_scores(found.trajectory, reference_trajectory))
    scores["one_object"] = one_object_share(frames)
    if reference is not None:
        scores.update({f"leak_{name}": hit for name, hit in leakage_hits(found, asked, reference).items()})
    return scores


def summarize(rows: Sequence[dict[str, float | bool | None]]) -> dict[str, tuple[float, float]]:
    """Mean and 95% CI half-width of every score over the samples (None/NaN entries are not counted)."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return {key: mean_ci([None if row.get(key) is None else float(row[key]) for row in rows]) for key in keys}


def report_prompts(count: int, motions: Sequence[str], seed: int) -> list[tuple[Scene, int]]:
    """`count` (scene, seed) pairs cycling through `motions`; seeds < 10000 are never in the pretraining pool."""
    rng = random.Random(seed)
    scenes_by_motion = {m: all_scenes((m,)) for m in motions}
    pairs = []
    for index in range(count):
        motion = motions[index % len(motions)]
        pairs.append((rng.choice(scenes_by_motion[motion]), rng.randrange(10_000)))
    return pairs


def base_quality_report(backbone: BackboneSpec, *, prompts: int = 64, held_out_prompts: int = 16, seed: int = 0,
                        settings: SamplingSettings = TOY_SAMPLING, batch: int = 16,
                        on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Appearance accuracy and motion fidelity of the base model on unseen prompt/seed pairs."""
    pairs = report_prompts(prompts, PRETRAIN_MOTIONS, seed) + report_prompts(held_out_prompts, (HELD_OUT_MOTION,),
                                                                             seed + 1)
    scenes, seeds = [p[0] for p in pairs], [p[1] for p in pairs]
    videos = generate_scenes(backbone, scenes, seeds, settings, batch=batch, on_batch=on_batch)
    samples = [Sample(scene, s, video, score_sample(video, scene, s)) for scene, s, video in zip(scenes, seeds, videos,
                                                                                                   strict=True)]
    pretrain_rows = [x.scores for x in samples if x.asked.motion != HELD_OUT_MOTION]
    held_rows = [x.scores for x in samples if x.asked.motion == HELD_OUT_MOTION]
    per_motion = {m: summarize([x.scores for x in samples if x.asked.motion == m])["fidelity"]
                  for m in (*PRETRAIN_MOTIONS, HELD_OUT_MOTION) if any(x.asked.motion == m for x in samples)}
    return {
        "pretrain_motions": summarize(pretrain_rows),
        "held_out_motion": {"name": HELD_OUT_MOTION, **summarize(held_rows)},
        "fidelity_per_motion": per_motion,
        "prompts": len(pretrain_rows), "held_out_prompts": len(held_rows),
        "sampling": {"steps": settings.steps, "guidance": settings.guidance, "frames": settings.frames,
                     "size": [settings.height, settings.width]},
        "samples": samples,
    }


def format_cell(value: tuple[float, float], percent: bool) -> str:
    """(mean, 95% CI half-width) as "87% ± 6" or "0.91 ± 0.03"."""
    mean, ci = value
    if not np.isfinite(mean):
        return "n/a"
    scale, unit, digits = (100, "%", 0) if percent else (1, "", 2)
    ci_text = f" ± {scale * ci:.{digits}f}" if np.isfinite(ci) else ""
    return f"{scale * mean:.{digits}f}{unit}{ci_text}"


def report_markdown(report: dict, command: str) -> str:
    """The quality report as the markdown section of docs/toyworld.md."""
    pre, held = report["pretrain_motions"], report["held_out_motion"]
    lines = [f"Command: `{command}`", "",
             f"{report['prompts']} prompt/seed pairs of the pretraining motions and {report['held_out_prompts']} "
             f"of the held-out motion `{held['name']}`; DDIM {report['sampling']['steps']} steps, guidance "
             f"{report['sampling']['guidance']}. Mean ± 95% CI.", "",
             "| prompts | " + " | ".join(f"{a} accuracy" for a in ATTRIBUTES) + " | motion fidelity | one object per frame |",
             "|---|" + "---|" * (len(ATTRIBUTES) + 2)]
    for label, row in (("pretraining motions", pre), (f"held-out `{held['name']}`", held)):
        cells = [format_cell(row[a], True) for a in ATTRIBUTES] + [format_cell(row["fidelity"], False),
                                                                    format_cell(row["one_object"], True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| motion | " + " | ".join(report["fidelity_per_motion"]) + " |",
              "|---|" + "---|" * len(report["fidelity_per_motion"]),
              "| fidelity | " + " | ".join(format_cell(v, False) for v in report["fidelity_per_motion"].values()) + " |"]
    # The held-out motion is novel when its distinctive component (the zigzag's vertical swing) is
    # absent, even though the base draws its straight part (the left-to-right sweep).
    axes = {"x corr.": "x_corr", "y corr.": "y_corr", "distinctive corr.": "distinct_corr",
            "distinctive amp.": "distinct_amp"}
    lines += ["", f"Held-out `{held['name']}` per axis (the distinctive component is its detrended vertical "
                  "swing; see Metrics):", "",
              "| " + " | ".join(axes) + " |", "|" + "---|" * len(axes),
              "| " + " | ".join(format_cell(held.get(key, (float("nan"), float("nan"))), False)
                                for key in axes.values()) + " |"]
    return "\n".join(lines) + "\n"


def replace_docs_section(path: str | Path, name: str, body: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in a markdown file."""
    path = Path(path)
    text = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no '{begin}' ... '{end}' markers to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}{end}{tail}")
