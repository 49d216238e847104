"""`motiondirector train-batch SPEC.yaml`: many LoRA jobs on a Ray cluster (docs/training.md, "Batch training").

The spec is read and validated here, before Ray is imported, so a bad spec exits 2 having started
nothing; the driver (pipelines/train_batch.py) is imported only then. While jobs run, a live table
shows each job's state, step, losses, it/s and ETA, fed by the workers through a Ray actor.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from motiondirector.commands.common import CatalogOption, ExitCode, JsonOption, console, fail, print_json

_STYLE = {"queued": "dim", "running": "cyan", "done": "green", "skipped": "blue", "failed": "red"}


def _losses(losses: dict[str, float] | None) -> str:
    shown = {k: v for k, v in (losses or {}).items() if k in ("loss_temporal", "loss_spatial", "loss_ad")}
    return "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in shown.items())


def _eta(row: dict[str, Any]) -> str:
    rate, step, steps = row.get("it_s"), row.get("step"), row.get("steps")
    if row["state"] != "running" or not rate or step is None or not steps:
        return ""
    seconds = max(steps - step, 0) / rate
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def render(snapshot: dict[str, Any], final: bool = False) -> Group:
    """The jobs table plus queued / running / done / skipped / failed counts."""
    table = Table(title=f"train-batch {snapshot['batch_id']}" + (" (finished)" if final else ""),
                  title_justify="left")
    for column in ("job", "state", "step", "losses", "it/s", "ETA", "catalog / error"):
        table.add_column(column, overflow="fold")
    counts: dict[str, int] = {}
    for row in snapshot["jobs"]:
        state = row["state"]
        counts[state] = counts.get(state, 0) + 1
        step = row.get("step")
        progress = f"{step if step is not None else '-'}/{row.get('steps') or '?'}"
        if row.get("resumed_from"):
            progress += f" (from {row['resumed_from']})"
        rate = row.get("it_s") or row.get("steps_per_second")
        detail = row.get("error") or ", ".join(row.get("catalog_ids") or [])
        table.add_row(row["name"], Text(state, style=_STYLE.get(state, "")), progress, _losses(row.get("losses")),
                      f"{rate:.2f}" if rate else "", _eta(row), detail)
    summary = "  ".join(f"{state} {counts.get(state, 0)}" for state in _STYLE)
    return Group(table, Text(summary))


def train_batch(
    spec: Annotated[Path, typer.Argument(help="Batch spec YAML: defaults, jobs / from_ingest, grid, resources.")],
    catalog: CatalogOption = None,
    storage: Annotated[str | None, typer.Option(
        "--storage", help="Checkpoints and batch reports (fsspec URI or folder); default: the spec's, "
                          "else runs/batch.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Train every job of SPEC on the Ray cluster (RAY_ADDRESS, else a local one); register the LoRAs."""
    from pipelines.batch_spec import SpecError, load_batch_spec

    try:
        batch = load_batch_spec(spec, storage=storage, catalog=catalog)
    except SpecError as error:
        raise fail(str(error)) from None
    if batch.catalog is None:
        from motiondirector import api

        batch.catalog = api.open_catalog(None).uri

    from pipelines.train_batch import run_batch  # imports Ray: only for a valid spec

    try:
        if as_json:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON report
                report = run_batch(batch)
        else:
            with Live(console=console, refresh_per_second=4, transient=True) as live:
                report = run_batch(batch, on_update=lambda snapshot: live.update(render(snapshot)))
    except KeyboardInterrupt:
        raise fail("interrupted: re-run the same command to resume unfinished jobs from their storage",
                   ExitCode.INTERRUPTED) from None
    if as_json:
        print_json(report)
    else:
        rows = [{**job, "step": job.get("step")} for job in report["jobs"]]
        console.print(render({"batch_id": report["batch_id"], "jobs": rows}, final=True))
        console.print(f"report: {report['report']}", highlight=False)
    if report["counts"]["failed"]:
        raise typer.Exit(int(ExitCode.FAILED))


def register(app: typer.Typer) -> None:
    app.command("train-batch")(train_batch)
