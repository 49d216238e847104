"""`motiondirector animate`: image(s) -> a cached appearance LoRA -> videos with a learned motion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motiondirector.commands.common import CatalogOption, JsonOption, console, reported_errors
from motiondirector.commands.generate import (
    CacheDirOption,
    FpsOption,
    FramesOption,
    GenerationDevice,
    GuidanceOption,
    MotionScaleOption,
    NegativeOption,
    OptionalBase,
    OutOption,
    PromptsOption,
    SeedOption,
    SizeOption,
    StepsOption,
    build_params,
    report_videos,
)
from motiondirector.commands.observers import RichProgress


def animate(
    images: Annotated[list[Path], typer.Argument(help="Image(s) whose appearance to animate.")],
    motion: Annotated[list[str], typer.Option("--motion", help="Motion (temporal) LoRA: a package, a run "
                                              "folder, RUN@step-<n> or a catalog id. Repeat to merge motions.")],
    out: OutOption,
    prompt: PromptsOption = None,
    base: OptionalBase = None,
    steps_train: Annotated[int, typer.Option("--steps-train", min=1, help="Training steps of the image LoRA "
                                             "(reference: 300 for one image, 1000 for several).")] = 300,
    caption: Annotated[str | None, typer.Option("--caption", help="Training caption of the images; default: the "
                                                "first --prompt.")] = None,
    motion_scale: MotionScaleOption = None,
    appearance_scale: Annotated[float, typer.Option("--appearance-scale", help="γ of the image LoRA.")] = 1.0,
    negative_prompt: NegativeOption = "",
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    frames: FramesOption = None,
    size: SizeOption = None,
    fps: FpsOption = None,
    seed: SeedOption = None,
    device: GenerationDevice = "auto",
    cache_dir: CacheDirOption = None,
    catalog: CatalogOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train (or reuse) a spatial LoRA on the images and generate them moving with the motion LoRA(s)."""
    from motiondirector import api

    with reported_errors():
        lookup = api.CatalogOnDemand(catalog)
        params = build_params(base=base, prompts=prompt, motions=motion, motion_scales=motion_scale,
                              appearances=None, appearance_scales=None, size=size, catalog=lookup,
                              negative_prompt=negative_prompt, steps=steps, guidance=guidance, frames=frames,
                              fps=fps, seed=seed)
        with RichProgress(console) as bars:
            videos = api.animate(images, params, caption=caption, steps_train=steps_train,
                                 appearance_scale=appearance_scale, device=device, cache_dir=cache_dir,
                                 catalog=lookup, observers=[bars])
        api.save_videos(videos, out)
    report_videos(videos, as_json)


def register(app: typer.Typer) -> None:
    app.command("animate")(animate)
