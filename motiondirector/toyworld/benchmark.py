"""The paper's Table 1 claim, measured in the toy world.

Reference clips show the held-out motion with one appearance. For each setting (one video, several
videos) and each mode (base = no LoRA, coupled, dual_path_no_ad, dual_path) LoRAs are trained with
the training library, then the same prompt × seed grid asking for *other* appearances is sampled
from the same initial noise in every mode, and the probes score appearance accuracy, motion
fidelity (against the reference clip's trajectory) and appearance leakage.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import product, zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import CacheRecord, fingerprint, latent_fingerprint, text_fingerprint
from motiondirector.sample import SamplingSettings
from motiondirector.toyworld.evaluate import (
    TOY_SAMPLING,
    format_cell,
    generate_scenes,
    score_sample,
    summarize,
)
from motiondirector.toyworld.probes import ATTRIBUTES, mean_ci
from motiondirector.toyworld.render import (
    BACKGROUNDS,
    HELD_OUT_MOTION,
    OBJECT_COLOURS,
    SHAPES,
    Clip,
    Scene,
    parse_caption,
    render,
)
from motiondirector.train.guard import TrainingDiverged

if TYPE_CHECKING:
    from motiondirector.config import TrainConfig

MODES = ("base", "coupled", "dual_path_no_ad", "dual_path")
# Seeds of benchmark samples; reference clips use seeds 0..videos-1.
_SAMPLE_SEED_OFFSET = 1000


@dataclass(frozen=True)
class BenchmarkSettings:
    motion: str = HELD_OUT_MOTION
    reference: str = "red circle on grey"
    videos: tuple[int, ...] = (1, 3)  # one setting per entry: single video, multi video
    prompts: int = 8
    seeds: int = 4
    steps: int = 150
    rank: int = 16
    lr: float = 1e-3
    ad_beta: float = 1.0
    high_share: float | None = None  # timestep emphasis of the LoRA training (config `timesteps:`); None: the model's
    high_from: int = 800
    # Several videos: "same" = the reference appearance with other seeds; "varied" = the paper's setting,
    # where the videos share the motion but not the look (extra appearances never among the prompts).
    multi_video_appearance: str = "same"
    modes: tuple[str, ...] = MODES
    seed: int = 0
    # LoRAs trained per (setting, mode), seeds seed, seed+1, ...; their samples are pooled in one row, so its CI
    # covers the spread between training runs, not only between samples of one run.
    training_runs: int = 1
    sampling: SamplingSettings = field(default_factory=lambda: TOY_SAMPLING)


def parse_appearance(text: str) -> tuple[str, str, str]:
    """"red circle on grey" (or a full caption) -> (colour, shape, background)."""
    words = re.findall(r"[a-z]+", text.lower())
    found = []
    for name, valid in (("colour", OBJECT_COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        hits = [w for w in words if w in valid]
        if len(hits) != 1:
            raise ValueError(f"--reference {text!r}: expected exactly one {name} ({', '.join(valid)})")
        found.append(hits[0])
    return found[0], found[1], found[2]


def _other_appearances(reference: Scene, seed: int) -> list[Scene]:
    """Every scene of the reference's motion whose colour, shape and background all differ from it, shuffled."""
    others = [Scene(c, s, b, reference.motion) for c, s, b in product(OBJECT_COLOURS, SHAPES, BACKGROUNDS)
              if c != reference.colour and s != reference.shape and b != reference.background]
    random.Random(seed).shuffle(others)
    return others


def other_appearance_prompts(reference: Scene, count: int, seed: int) -> list[Scene]:
    """`count` scenes of the reference's motion whose colour, shape and background all differ from it."""
    others = _other_appearances(reference, seed)
    if count > len(others):
        raise ValueError(f"--prompts {count}: the world has only {len(others)} appearances that differ from "
                         f"the reference in colour, shape and background")
    return others[:count]


# How the extra clips of a multi-video setting look (`--multi-video-appearance`).
MULTI_VIDEO_APPEARANCES = {
    "same": "",  # the reference appearance, other seeds
    "varied": "varied look",  # the paper's setting: each clip differs from the reference in every attribute
    "colour": "colour only",  # each clip differs from the reference in one attribute only ...
    "shape": "shape only",
    "background": "background only",
    "one-factor": "one attribute each",  # ... colour, shape and background in turn: every value seen, no prompt's mix
    "colour-background": "colour × background",  # the reference's shape in every other colour/background pair
}
_ATTRIBUTE_VALUES = {"colour": tuple(OBJECT_COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}


def _one_attribute_changed(reference: Scene, attribute: str) -> list[Scene]:
    return [replace(reference, **{attribute: value}) for value in _ATTRIBUTE_VALUES[attribute]
            if value != getattr(reference, attribute)]


def reference_scenes(reference: Scene, prompts: list[Scene], videos: int, appearance: str) -> list[Scene]:
    """The scene of each reference clip: the reference, then the extra looks `appearance` names. None of them is
    a prompt: `varied` draws looks that differ from the reference in colour, shape and background and are not
    asked for; the other modes keep one or two of the reference's attributes, which no prompt shares."""
    if appearance not in MULTI_VIDEO_APPEARANCES:
        raise ValueError(f"multi-video appearance {appearance!r}: expected one of {', '.join(MULTI_VIDEO_APPEARANCES)}")
    if appearance == "same" or videos == 1:
        return [reference] * videos
    if appearance == "varied":
        asked = {p.caption for p in prompts}
        spare = [s for s in _other_appearances(reference, seed=0) if s.caption not in asked]
    elif appearance == "one-factor":  # round-robin over the attributes, so a few videos already vary all three
        per_attribute = [_one_attribute_changed(reference, a) for a in _ATTRIBUTE_VALUES]
        spare = [s for looks in zip_longest(*per_attribute) for s in looks if s is not None]
    elif appearance == "colour-background":  # a prompt's colour and background are seen together, its shape is not
        spare = [replace(reference, colour=c, background=b) for c, b in product(OBJECT_COLOURS, BACKGROUNDS)
                 if (c, b) != (reference.colour, reference.background)]
    else:
        spare = _one_attribute_changed(reference, appearance)
    if len(spare) < videos - 1:
        raise ValueError(f"{videos} videos of {MULTI_VIDEO_APPEARANCES[appearance]} need {videos - 1} appearances "
                         f"besides the reference and the {len(prompts)} prompts; only {len(spare)} are left "
                         f"(ask for fewer videos or prompts)")
    return [reference, *spare[:videos - 1]]


def clip_records(backbone: BackboneSpec, clips: list[Clip]) -> list[CacheRecord]:
    """Encode rendered clips into training records (one video each, like files of a dataset)."""
    records = []
    for index, clip in enumerate(clips):
        frames, height, width = clip.frames.shape[0], clip.frames.shape[1], clip.frames.shape[2]
        content = fingerprint("toyworld-clip", clip.caption, clip.seed, frames, height, width)
        latents = backbone.encode_video(torch.from_numpy(clip.frames).unsqueeze(0))
        text = backbone.encode_text([clip.caption])[0]
        records.append(CacheRecord(
            dataset=f"toyworld-{clip.scene.motion}", video_path=f"toyworld://{clip.caption}/seed-{clip.seed}",
            video_index=index, content_hash=content, clip_index=0, frame_indices=list(range(frames)),
            source_fps=8.0, caption=clip.caption, size=(height, width), crop="none",
            latent_mean=latents.mean[0].cpu().numpy().astype(np.float16),
            latent_std=latents.std[0].cpu().numpy().astype(np.float16),
            text_embedding=text.cpu().numpy().astype(np.float16),
            latent_fingerprint=latent_fingerprint(content, list(range(frames)), (height, width), "none",
                                                  backbone.vae_id),
            text_fingerprint=text_fingerprint(clip.caption, backbone.text_encoder_id)))
    return records


def train_config(settings: BenchmarkSettings, backbone: BackboneSpec, mode: str, videos: int,
                 caption: str, seed: int | None = None) -> TrainConfig:
    """The training config of one benchmark run (data come as records, so `data` only names them);
    `seed`: its training seed (default: the settings' seed)."""
    from motiondirector.config import TrainConfig

    sampling = settings.sampling
    return TrainConfig.model_validate({
        "base": backbone.model_id, "device": str(backbone.device), "seed": settings.seed if seed is None else seed,
        "steps": settings.steps,
        "mode": mode, "lora": {"rank": settings.rank},
        # Reference configs: weight decay 1e-2 for one video, 1e-4 for several.
        "optimizer": {"lr": settings.lr, "weight_decay": 1e-2 if videos == 1 else 1e-4},
        "ad_beta": settings.ad_beta, "gradient_checkpointing": False, "checkpoint_every": 0,
        "timesteps": {"high_share": settings.high_share, "high_from": settings.high_from},
        "log_every": 10, "validation": {"every": 0},
        "data": {"sources": [f"toyworld://{settings.motion}"], "caption": caption, "frames": sampling.frames,
                 "size": [sampling.height, sampling.width]},
    })


def _inference_choices(packages: dict, mode: str) -> list:
    """The paper's inference: the motion (temporal) LoRA alone; coupled has one LoRA set, used whole."""
    from motiondirector.generate import LoraChoice

    choices = [("motion", LoraChoice(reference=packages["temporal"]))]
    if mode == "coupled":
        choices += [("appearance", LoraChoice(reference=folder)) for folder in packages["spatial"]]
    return choices


def run_benchmark(backbone: BackboneSpec, settings: BenchmarkSettings, out: Path, *,
                  on_stage: Callable[[str], None] = print) -> dict:
    """Train, sample and score every (setting, mode); writes results under `out` and returns them."""
    from motiondirector.generate import composed
    from motiondirector.train.loop import train
    from motiondirector.video_io import write_gif, write_grid_png

    for mode in settings.modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if settings.training_runs < 1:
        raise ValueError(f"training_runs {settings.training_runs}: expected at least 1 LoRA per setting and mode")
    colour, shape, background = parse_appearance(settings.reference)
    reference = Scene(colour, shape, background, settings.motion)
    out.mkdir(parents=True, exist_ok=True)
    prompts = other_appearance_prompts(reference, settings.prompts, settings.seed)
    pairs = [(scene, _SAMPLE_SEED_OFFSET + s) for scene in prompts for s in range(settings.seeds)]
    scenes, seeds = [p[0] for p in pairs], [p[1] for p in pairs]
    # The reference prompt itself: did the LoRA learn the motion at all (before asking whether it transfers)?
    own_seeds = [_SAMPLE_SEED_OFFSET + s for s in range(2 * settings.seeds)]
    own_scenes = [reference] * len(own_seeds)
    size = (settings.sampling.height, settings.sampling.width)
    clips = [render(scene, frames=settings.sampling.frames, size=size, seed=v) for v, scene in
             enumerate(reference_scenes(reference, prompts, max(settings.videos), settings.multi_video_appearance))]
    write_gif(clips[0].frames, out / "reference.gif")
    rows, grids = [], {}
    base_result = None
    progress = out / "rows.jsonl"  # one complete row per line as it is measured (a long run's partial results)
    progress.write_text("")

    def add(row: dict) -> None:
        rows.append(row)
        with progress.open("a") as log:
            log.write(json.dumps(row) + "\n")

    for videos in settings.videos:
        records = clip_records(backbone, clips[:videos])
        for mode in settings.modes:
            label = f"{videos} video{'s' if videos > 1 else ''}"
            if videos > 1 and MULTI_VIDEO_APPEARANCES[settings.multi_video_appearance]:
                label += f" ({MULTI_VIDEO_APPEARANCES[settings.multi_video_appearance]})"
            if mode == "base" and base_result is not None:
                add({**base_result, "setting": label})
                continue
            on_stage(f"{label}: {mode}")
            train_seconds, runs = 0.0, []
            if mode == "base":
                runs.append((settings.seed, generate_scenes(backbone, scenes, seeds, settings.sampling),
                             generate_scenes(backbone, own_scenes, own_seeds, settings.sampling)))
            else:
                try:
                    for run in range(settings.training_runs):
                        seed = settings.seed + run
                        folder = f"{videos}v-{mode}" + (f"-seed{seed}" if settings.training_runs > 1 else "")
                        summary = train(train_config(settings, backbone, mode, videos, reference.caption, seed),
                                        out / "runs" / folder, overwrite=True, backbone=backbone, records=records)
                        train_seconds += summary.seconds
                        with composed(backbone, _inference_choices(summary.packages, mode)):
                            runs.append((seed, generate_scenes(backbone, scenes, seeds, settings.sampling),
                                         generate_scenes(backbone, own_scenes, own_seeds, settings.sampling)))
                except TrainingDiverged as diverged:  # a row that says so, not a lost benchmark
                    on_stage(f"{label}: {mode}: {diverged}")
                    add({"setting": label, "mode": mode, "diverged": str(diverged), "metrics": {}})
                    continue
            scores, own_scores, per_run = [], [], []
            for seed, run_frames, run_own in runs:
                run_scores = [score_sample(video, scene, sample_seed, reference, clips[0].trajectory)
                              for video, scene, sample_seed in zip(run_frames, scenes, seeds, strict=True)]
                for row in run_scores:
                    row["appearance"] = float(np.mean([row[a] for a in ATTRIBUTES]))
                scores += run_scores
                own_scores += [score_sample(video, reference, sample_seed, None, clips[0].trajectory)
                               for video, sample_seed in zip(run_own, own_seeds, strict=True)]
                per_run.append({"seed": seed, "metrics": summarize(run_scores)})
            frames = runs[0][1]  # the grid and gif show the first training run
            result = {"setting": label, "mode": mode, "train_seconds": round(train_seconds, 1),
                      "metrics": summarize(scores), "samples": scores,
                      "reference_prompt": summarize(own_scores), "reference_prompt_samples": own_scores}
            if mode == "base":
                base_result = result
            else:
                result["training_runs"] = per_run
                # Every training run sampled the base's prompts and noise: pair each run with the base samples.
                result["paired"] = (paired_differences(scores, base_result["samples"] * len(runs))
                                    if base_result else {})
            add(result)
            grids.setdefault(label, []).append(frames[:4])
            write_gif(frames[0], out / "gifs" / f"{videos}v-{mode}.gif")
    for label, per_mode in grids.items():
        stacked = torch.stack(per_mode)  # (modes, 4 samples, F, H, W, 3): one row per mode and sample
        write_grid_png(stacked.reshape(-1, *stacked.shape[3:]), out / f"grid-{label.replace(' ', '-')}.png",
                       columns=stacked.shape[2])
    result = {"reference": reference.caption, "reference_clips": [c.caption for c in clips], "prompts": [s.caption for s in prompts],
              "samples_per_mode": len(pairs), "settings": asdict(settings), "rows": rows}
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    (out / "benchmark.md").write_text(table_markdown(result))
    return result


PAIRED_KEYS = ("motion_fidelity", "y_corr", "distinct_corr", "distinct_amp", "x_corr", "appearance", "leak_any",
               "one_object")
_PAIRED_PERCENT = {"appearance", "leak_any", "one_object"}
# The paper's two comparisons between LoRA modes: dual-path against one coupled LoRA set (is the motion untied
# from the reference's look?) and against dual-path without the appearance-debiased loss (does L_ad help?).
MODE_CONTRASTS = (("dual_path", "coupled"), ("dual_path", "dual_path_no_ad"))


def paired_differences(scores: list[dict], base_scores: list[dict]) -> dict[str, tuple[float, float]]:
    """Mean ± 95% CI of (mode − base) per sample: the same prompt and initial noise, so the paired
    difference is far tighter than the difference of two row means."""
    differences = {}
    for key in PAIRED_KEYS:
        pairs = [(a.get(key), b.get(key)) for a, b in zip(scores, base_scores, strict=True)]
        differences[key] = mean_ci([float(a) - float(b) for a, b in pairs if a is not None and b is not None])
    return differences


def mode_contrasts(rows: list[dict]) -> list[dict]:
    """Paired (mode − other mode) per setting: LoRA rows of one setting share prompts, noise and training seeds,
    so sample i of one row pairs with sample i of the other (row means alone hide how consistent a gap is)."""
    by_key = {(row["setting"], row["mode"]): row for row in rows if row.get("samples")}
    contrasts = []
    for (setting, mode), row in by_key.items():
        for first, second in MODE_CONTRASTS:
            other = by_key.get((setting, second))
            if mode == first and other and len(other["samples"]) == len(row["samples"]):
                contrasts.append({"setting": setting, "contrast": f"{first} − {second}",
                                  "paired": paired_differences(row["samples"], other["samples"])})
    return contrasts


MOTION_COLUMNS = (("motion_fidelity", "motion fidelity"), ("fidelity", "axes mean"), ("x_corr", "x corr."),
                  ("y_corr", "y corr."), ("scale_corr", "scale corr."), ("distinct_corr", "distinctive corr."),
                  ("distinct_amp", "distinctive amp."), ("one_object", "one object per frame"))
_PERCENT = {"leak_any", "one_object"}


def table_markdown(result: dict) -> str:
    """Table-1-style markdown, mean ± 95% CI per (setting, mode): motion and appearance, then per attribute."""
    header = (f"Reference: \"{result['reference']}\"; {result['samples_per_mode']} samples per row "
              f"(prompts asking for another colour, shape and background × seeds, the same noise in every row).")
    training_runs = result["settings"].get("training_runs", 1)
    if training_runs > 1:
        header += (f" Each LoRA row pools {training_runs} training runs (seeds {result['settings']['seed']}…"
                   f"{result['settings']['seed'] + training_runs - 1}), each sampled with those prompts and noise: "
                   f"{training_runs * result['samples_per_mode']} samples, a CI that covers the training runs' spread.")
    others = [c for c in result.get("reference_clips", []) if c != result["reference"]]
    if others:
        header += (" The multi-video rows also train on \"" + "\", \"".join(others) + "\"; leakage is measured "
                   "against the first reference.")
    motion = ["| setting | mode | appearance accuracy | leakage (any) | " + " | ".join(c[1] for c in MOTION_COLUMNS)
              + " |", "|---|---|---|---|" + "---|" * len(MOTION_COLUMNS)]
    attributes = ["| setting | mode | " + " | ".join(f"{a} acc." for a in ATTRIBUTES) + " | "
                  + " | ".join(f"{a} leak" for a in ATTRIBUTES) + " |", "|---|---|" + "---|" * (2 * len(ATTRIBUTES))]
    for row in result["rows"]:
        m, start = row["metrics"], f"| {row['setting']} | {row['mode']} | "
        if "diverged" in row:
            motion.append(start + "training diverged | " + " | ".join(["–"] * (1 + len(MOTION_COLUMNS))) + " |")
            attributes.append(start + " | ".join(["–"] * (2 * len(ATTRIBUTES))) + " |")
            continue
        cells = [format_cell(m["appearance"], True), format_cell(m["leak_any"], True)]
        cells += [format_cell(m[key], key in _PERCENT) if key in m else "n/a" for key, _ in MOTION_COLUMNS]
        motion.append(start + " | ".join(cells) + " |")
        attributes.append(start + " | ".join([format_cell(m[a], True) for a in ATTRIBUTES]
                                             + [format_cell(m[f"leak_{a}"], True) for a in ATTRIBUTES]) + " |")
    tables = [header, "", *motion, "", *attributes]
    paired = [row for row in result["rows"] if row.get("paired")]
    if paired:
        tables += _paired_table(paired, "mode")
        tables += ["", "Δ = paired difference from the base sample with the same prompt and noise (mean ± 95% CI)."]
    contrasts = mode_contrasts(result["rows"])
    if contrasts:
        tables += _paired_table(contrasts, "contrast")
        tables += ["", "Δ between LoRA modes: each sample minus the other mode's sample with the same prompt, noise "
                   "and training seed (mean ± 95% CI)."]
    tables += per_prompt_table(result)
    if training_runs > 1:
        tables += ["", "Per training run (new appearances): how much one LoRA differs from another.", "",
                   "| setting | mode | seed | " + " | ".join(name for key, name in MOTION_COLUMNS if key in _RUN_KEYS)
                   + " | appearance accuracy |", "|---|---|---|" + "---|" * (len(_RUN_KEYS) + 1)]
        tables += [f"| {row['setting']} | {row['mode']} | {run['seed']} | " + " | ".join(
            format_cell(run["metrics"][key], key in _PERCENT) for key, _ in MOTION_COLUMNS if key in _RUN_KEYS)
            + f" | {format_cell(run['metrics']['appearance'], True)} |"
            for row in result["rows"] for run in row.get("training_runs", [])]
    own = [row for row in result["rows"] if row.get("reference_prompt")]
    if own:
        count = 2 * result["settings"]["seeds"]  # per training run
        runs = f" × {training_runs} training runs in the LoRA rows" if training_runs > 1 else ""
        tables += ["", f"On the reference prompt itself (\"{result['reference']}\", {count} seeds{runs}): was the "
                   "motion learnt at all?", "",
                   "| setting | mode | " + " | ".join(name for key, name in MOTION_COLUMNS if key in _OWN_KEYS) + " |",
                   "|---|---|" + "---|" * len(_OWN_KEYS)]
        tables += [f"| {row['setting']} | {row['mode']} | " + " | ".join(
            format_cell(row["reference_prompt"][key], key in _PERCENT) if key in row["reference_prompt"] else "n/a"
            for key, _ in MOTION_COLUMNS if key in _OWN_KEYS) + " |" for row in own]
    return "\n".join(tables) + "\n"


def _paired_table(rows: list[dict], column: str) -> list[str]:
    names = {"appearance": "appearance", "leak_any": "leakage", **dict(MOTION_COLUMNS)}
    lines = ["", f"| setting | {column} | " + " | ".join(f"Δ {names[k]}" for k in PAIRED_KEYS) + " |",
             "|---|---|" + "---|" * len(PAIRED_KEYS)]
    return lines + [f"| {row['setting']} | {row[column]} | "
                    + " | ".join(_signed(row["paired"][k], k in _PAIRED_PERCENT) for k in PAIRED_KEYS) + " |"
                    for row in rows]


def per_prompt_table(result: dict) -> list[str]:
    """Each prompt's y corr. / distinctive amp. per row: samples of one prompt are alike (their CI in the row
    tables counts them as independent), so what a row's mean hides between appearances shows here."""
    prompts, seeds = result["prompts"], result["settings"]["seeds"]
    rows = [row for row in result["rows"] if row.get("samples")]
    if len(prompts) < 2 or not rows:
        return []
    names = [f"{scene.colour} {scene.shape}, {scene.background}" for scene in map(parse_caption, prompts)]
    lines = ["", "Per prompt (y corr. / distinctive amp., mean over seeds and training runs):", "",
             "| setting | mode | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(prompts)]
    for row in rows:
        cells = []
        for index in range(len(prompts)):
            mine = [sample for position, sample in enumerate(row["samples"])
                    if (position // seeds) % len(prompts) == index]
            means = [[s[key] for s in mine if s[key] is not None and np.isfinite(s[key])]
                     for key in ("y_corr", "distinct_amp")]
            cells.append(" / ".join(f"{np.mean(values):.2f}" if values else "n/a" for values in means))
        lines.append(f"| {row['setting']} | {row['mode']} | " + " | ".join(cells) + " |")
    return lines


_RUN_KEYS = ("y_corr", "distinct_corr", "distinct_amp", "one_object")
_OWN_KEYS = ("motion_fidelity", "x_corr", "y_corr", "distinct_corr", "distinct_amp", "one_object")


def _signed(value: tuple[float, float], percent: bool) -> str:
    mean, ci = value
    if np.isnan(mean):
        return "n/a"
    return f"{100 * mean:+.0f} ± {100 * ci:.0f} pp" if percent else f"{mean:+.2f} ± {ci:.2f}"
