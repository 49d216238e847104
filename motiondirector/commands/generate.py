"""`motiondirector generate`: videos from a base model plus motion/appearance LoRAs, or a replay of a sidecar.

The sampling options are shared with `motiondirector animate` (commands/animate.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from motiondirector.commands.common import CatalogOption, JsonOption, console, print_json, reported_errors
from motiondirector.commands.observers import RichProgress

if TYPE_CHECKING:
    from motiondirector.api import CatalogOnDemand, GeneratedVideo, GenerationParams

OutOption = Annotated[Path, typer.Option("--out", help="Folder for the videos and their sidecars.")]
OptionalBase = Annotated[str | None, typer.Option(
    "--base", help="Base model: 'toy', a diffusers folder or a hub id. Default: the base of the first LoRA.")]
PromptsOption = Annotated[list[str] | None, typer.Option("--prompt", help="One video per prompt.")]
MotionOption = Annotated[list[str] | None, typer.Option(
    "--motion", help="Motion (temporal) LoRA: a package, a run folder, RUN@step-<n> or a catalog id. Repeat to merge "
    "motions.")]
MotionScaleOption = Annotated[list[float] | None, typer.Option("--motion-scale", help="γ of the i-th --motion.")]
AppearanceScaleOption = Annotated[list[float] | None, typer.Option(
    "--appearance-scale", help="γ of the i-th --appearance.")]
NegativeOption = Annotated[str, typer.Option("--negative-prompt")]
# Sampling options default to the base model's own values (docs/generation.md, "Defaults").
StepsOption = Annotated[int | None, typer.Option("--steps", min=1, help="DDIM steps; default: the model's.")]
GuidanceOption = Annotated[float | None, typer.Option("--guidance", min=0, help="Classifier-free guidance scale; "
                                                      "default: the model's.")]
FramesOption = Annotated[int | None, typer.Option("--frames", min=1, help="Default: the model's.")]
SizeOption = Annotated[str | None, typer.Option("--size", help="HEIGHTxWIDTH; default: the model's.")]
FpsOption = Annotated[float | None, typer.Option("--fps", min=0.1, help="Default: the model's.")]
SeedOption = Annotated[int | None, typer.Option("--seed", min=0, help="Seed of the first video (video i: seed+i); "
                                                "default: random, recorded in the sidecar.")]
GenerationDevice = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
CacheDirOption = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Cache root (noise priors, image LoRAs); default $MOTIONDIRECTOR_CACHE or "
    "~/.cache/motiondirector.")]


def parse_size(text: str) -> tuple[int, int]:
    """'384x384' (HEIGHTxWIDTH) or '384' -> (height, width)."""
    try:
        values = [int(part) for part in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 384x384")
    return values[0], values[1]


def pair_scales(option: str, references: list[str], scales: list[float]) -> list[dict]:
    """The i-th scale goes with the i-th LoRA; LoRAs without one get 1.0."""
    if len(scales) > len(references):
        raise ValueError(f"{len(scales)} {option}-scale values for {len(references)} {option} LoRAs")
    padded = list(scales) + [1.0] * (len(references) - len(scales))
    return [{"reference": ref, "scale": scale} for ref, scale in zip(references, padded, strict=True)]


def build_params(*, base: str | None, prompts: list[str] | None, motions: list[str] | None,
                 motion_scales: list[float] | None, appearances: list[str] | None,
                 appearance_scales: list[float] | None, size: str | None, catalog: CatalogOnDemand,
                 **sampling: Any) -> GenerationParams:
    """Options -> validated GenerationParams; an omitted --base is the first LoRA's base model."""
    from motiondirector import api

    if not prompts:
        raise ValueError("at least one --prompt is needed")
    height, width = parse_size(size) if size else (None, None)
    data = dict(base=base or "", prompts=prompts, height=height, width=width,
                motions=pair_scales("--motion", motions or [], motion_scales or []),
                appearances=pair_scales("--appearance", appearances or [], appearance_scales or []), **sampling)
    params = api.validated_params(data, "options")
    return params if base else params.model_copy(update={"base": api.package_base(params, catalog)})


def report_videos(videos: list[GeneratedVideo], as_json: bool) -> None:
    if as_json:
        print_json([{"index": v.index, "prompt": v.prompt, "seed": v.seed,
                     "files": {kind: str(path) for kind, path in v.files.items()}} for v in videos])
        return
    for video in videos:
        console.print(f"{video.files['mp4']}  (seed {video.seed})", highlight=False)


def generate(
    out: OutOption,
    base: OptionalBase = None,
    prompt: PromptsOption = None,
    motion: MotionOption = None,
    motion_scale: MotionScaleOption = None,
    appearance: Annotated[list[str] | None, typer.Option(
        "--appearance", help="Appearance (spatial) LoRA: a package, RUN/spatial/<k>, a run with one spatial "
        "LoRA, or a catalog id.")] = None,
    appearance_scale: AppearanceScaleOption = None,
    negative_prompt: NegativeOption = "",
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    guidance_rescale: Annotated[float, typer.Option(
        "--guidance-rescale", min=0.0, max=1.0, help="Guidance rescale φ (Lin et al. 2024; 0.7 for "
        "zero-terminal-SNR bases with strong guidance); 0 = off.")] = 0.0,
    frames: FramesOption = None,
    size: SizeOption = None,
    fps: FpsOption = None,
    seed: SeedOption = None,
    noise_prior: Annotated[float, typer.Option("--noise-prior", min=0.0, max=1.0,
                                               help="Strength p of the reference clip's inverted noise.")] = 0.0,
    reference: Annotated[Path | None, typer.Option("--reference", help="Video for --noise-prior.")] = None,
    fuse: Annotated[bool, typer.Option("--fuse", help="Fold LoRAs into the weights (faster sampling).")] = False,
    replay_from: Annotated[Path | None, typer.Option(
        "--from", help="Replay a sidecar JSON: same parameters, seed and packages (other options are ignored).")]
    = None,
    device: GenerationDevice = "auto",
    cache_dir: CacheDirOption = None,
    catalog: CatalogOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate videos with learned motions (and appearances); write mp4, gif, png grid and a JSON sidecar."""
    from motiondirector import api

    with reported_errors():
        lookup = api.CatalogOnDemand(catalog)
        with RichProgress(console) as bars:
            videos = _generate_or_replay(replay_from, lookup, device=device, cache_dir=cache_dir, observers=[bars],
                                         base=base, prompts=prompt, motions=motion, motion_scales=motion_scale,
                                         appearances=appearance, appearance_scales=appearance_scale, size=size,
                                         negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                         guidance_rescale=guidance_rescale,
                                         frames=frames, fps=fps, seed=seed, noise_prior=noise_prior,
                                         reference_video=str(reference) if reference else None, fuse=fuse)
        api.save_videos(videos, out)
    report_videos(videos, as_json)


def _generate_or_replay(replay_from: Path | None, lookup: CatalogOnDemand, *, device: str,
                        cache_dir: Path | None, observers: list, **options: Any) -> list[GeneratedVideo]:
    from motiondirector import api

    if replay_from is not None:
        return api.replay(replay_from, device=device, cache_dir=cache_dir, catalog=lookup, observers=observers)
    params = build_params(catalog=lookup, **options)
    return api.generate(params, device=device, cache_dir=cache_dir, catalog=lookup, observers=observers)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
