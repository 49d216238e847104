"""`motiondirector train CONFIG.yaml`: train MotionDirector LoRAs into a run folder (docs/training.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motiondirector.commands.common import ExitCode, JsonOption, console, fail, print_json, reported_errors
from motiondirector.commands.observers import RichProgress, TensorBoardScalars, losses_text


def train(
    config: Annotated[Path, typer.Argument(help="Training config YAML (see configs/ and docs/training.md).")],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key, KEY=VALUE with a YAML value (e.g. optimizer.lr=1e-4); repeatable.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder; default runs/<config name>.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder OUT.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N (default: the "
                                                                "config's).")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Record cache root (default: the config's, "
                                                                       "$MOTIONDIRECTOR_CACHE or ~/.cache/motiondirector).")] = None,
    catalog: Annotated[str | None, typer.Option("--catalog", help="On success, register the run's LoRAs in "
                                                "this catalog (fsspec URI) under one run id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Train the config's spatial and temporal LoRAs; exit 130 after checkpointing on SIGINT/SIGTERM."""
    from motiondirector import api

    if resume and overwrite:
        raise fail("--resume and --overwrite exclude each other")
    with reported_errors():
        settings = api.load_config(config, overrides or [])
        updates = {key: value for key, value in (("device", device), ("cache_dir", cache_dir)) if value is not None}
        if updates:
            settings = settings.model_copy(update={k: str(v) for k, v in updates.items()})
        folder = out or Path("runs") / config.stem
        try:
            with RichProgress(console) as bars, TensorBoardScalars(settings.log_every) as tensorboard:
                summary, manifests = api.train_and_register(settings, folder, catalog, resume=resume,
                                                            overwrite=overwrite, observers=[bars, tensorboard])
        except api.TrainingInterrupted as stopped:
            if as_json:
                print_json({"out_dir": str(folder), "interrupted": True, "step": stopped.step,
                            "checkpoint": str(stopped.checkpoint)})
            raise fail(str(stopped), ExitCode.INTERRUPTED) from None
        except api.RegistrationError as error:
            raise fail(str(error), ExitCode.FAILED) from None
    registered = [manifest.id for manifest in manifests]
    if as_json:
        print_json({**summary.to_json(), **({"catalog_ids": registered} if catalog is not None else {})})
        return
    console.print(f"trained {summary.steps} steps in {summary.seconds:.1f} s ({summary.mode}, spatial LoRAs "
                  f"{summary.routing}); losses: {losses_text(summary.losses)}", highlight=False)
    for catalog_id in registered:
        console.print(f"registered {catalog_id} in {catalog}", highlight=False)
    print(summary.out_dir)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
