"""`motiondirector eval`: CLIP text-frame score, temporal consistency and PickScore of generated videos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from motiondirector.commands.common import DeviceOption, JsonOption, console, print_json, reported_errors


def evaluate(
    videos_dir: Annotated[Path, typer.Argument(help="Folder of generated .mp4 videos (prompts from their sidecars).")],
    clip: Annotated[str, typer.Option("--clip", help="CLIP model: local folder or hub id.")]
    = "openai/clip-vit-large-patch14",
    pickscore: Annotated[str | None, typer.Option("--pickscore", help="PickScore model (e.g. "
                                                  "yuvalkirstain/PickScore_v1); omitted: no PickScore.")] = None,
    pickscore_processor: Annotated[str | None, typer.Option(
        "--pickscore-processor", help="Processor for --pickscore; default: the model's own, or for "
        "PickScore_v1 the laion CLIP-ViT-H-14 processor its authors use.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where metrics go; default VIDEOS_DIR/metrics.")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Score a folder of videos with the paper's automatic metrics; writes per-video JSON and a summary."""
    from motiondirector.api import (
        DEFAULT_PICKSCORE,
        DEFAULT_PICKSCORE_PROCESSOR,
        METRICS,
        ClipScorer,
        evaluate_videos,
        resolve_device,
    )

    with reported_errors():
        target = resolve_device(device)
        clip_scorer = ClipScorer.load(clip, device=target)
        pick_scorer = None
        if pickscore:
            processor = pickscore_processor or (DEFAULT_PICKSCORE_PROCESSOR
                                                if pickscore == DEFAULT_PICKSCORE else None)
            pick_scorer = ClipScorer.load(pickscore, processor, device=target)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("scoring videos", total=None)
            summary = evaluate_videos(videos_dir, clip_scorer, pick_scorer, out,
                                      on_video=lambda done, total: progress.update(task, completed=done,
                                                                                   total=total))
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"{summary['videos']} videos in {videos_dir}")
    for column in ("metric", "mean", "videos"):
        table.add_column(column)
    for metric in METRICS:
        value = summary["metrics"][metric]
        table.add_row(metric, "-" if value["mean"] is None else f"{value['mean']:.2f}", str(value["videos"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
