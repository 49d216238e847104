"""`motiondirector cache ls|clear`: what the local record cache holds, and deleting it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from motiondirector.commands.common import JsonOption, console, print_json, reported_errors

cache_app = typer.Typer(no_args_is_help=True, help="The local cache of encoded clips (latents + text embeddings).")

CacheDirOption = Annotated[str | None, typer.Option(
    "--cache-dir", help="Cache root; default $MOTIONDIRECTOR_CACHE or ~/.cache/motiondirector.")]


def _size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _prefixes(fingerprints: list[str], shown: int = 3) -> str:
    text = " ".join(fp[:8] for fp in fingerprints[:shown])
    return text + (f" +{len(fingerprints) - shown}" if len(fingerprints) > shown else "")


@cache_app.command("ls")
def ls(cache_dir: CacheDirOption = None, as_json: JsonOption = False) -> None:
    """List cached datasets: videos, clips, size on disk, fingerprint prefixes."""
    from dataclasses import asdict

    from motiondirector.api import cache_root, list_cache

    with reported_errors():
        summaries = list_cache(cache_dir)
    root = cache_root(cache_dir)
    if as_json:
        print_json({"root": str(root), "datasets": [asdict(summary) for summary in summaries]})
        return
    if not summaries:
        console.print(f"the cache at {root} is empty")
        return
    table = Table(title=f"record cache at {root}")
    for column in ("dataset", "videos", "clips", "size", "latent fingerprints", "text fingerprints"):
        table.add_column(column)
    for summary in summaries:
        table.add_row(summary.dataset, str(summary.videos), str(summary.clips), _size(summary.bytes),
                      _prefixes(summary.latent_fingerprints), _prefixes(summary.text_fingerprints))
    console.print(table)


@cache_app.command("clear")
def clear(
    cache_dir: CacheDirOption = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset's records.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete cached records (all, or one dataset's). They are re-encoded on next use."""
    from motiondirector.api import cache_root, clear_cache

    root = cache_root(cache_dir)
    what = f"dataset {dataset!r}" if dataset else "all records"
    if not yes and not typer.confirm(f"Delete {what} from the cache at {root}?", err=True):
        console.print("nothing deleted")
        raise typer.Exit(1)
    with reported_errors():
        removed = clear_cache(cache_dir, dataset)
    if as_json:
        print_json({"root": str(root), "dataset": dataset, "removed_records": removed})
    else:
        console.print(f"removed {removed} records from {root}")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
