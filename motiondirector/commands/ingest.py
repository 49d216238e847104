"""`motiondirector ingest SPEC.yaml`: encode many datasets into a shared latent cache with Ray Data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from motiondirector.commands.common import JsonOption, console, print_json, reported_errors


def ingest(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="Ingest spec (see docs/ingest.md).")],
    output: Annotated[str | None, typer.Option("--output", help="Output URI (local path or fsspec URL); "
                                               "overrides the spec's `output`.")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Default base model; overrides the spec's `base` "
                                             "(datasets that name their own keep it).")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Afterwards, compact the output to one commit holding only "
                                        "current rows, deleting superseded rows and crashed runs.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Decode and encode every dataset of SPEC on Ray (RAY_ADDRESS, else a local cluster) and commit the result.

    Files that cannot be used are listed as rejects and do not stop the run. Clips already committed
    are skipped; a changed caption re-encodes only the text embedding.
    """
    from motiondirector.api import load_ingest_spec

    with reported_errors():
        spec = load_ingest_spec(spec_path, base=base, output=output)
        if not spec.output:
            raise ValueError(f"{spec_path}: no `output` in the spec; pass --output URI")
        from pipelines.ingest import run_ingest  # Ray stays out of motiondirector/: imported only here

        result = run_ingest(spec, prune_after=prune)
    if as_json:
        print_json(result.as_dict())
        return
    table = Table(title=f"ingested into {result.output}")
    for column in ("dataset", "clips", "encoded", "reused latents", "already committed", "rejected files"):
        table.add_column(column)
    for name, summary in result.datasets.items():
        table.add_row(name, str(summary.clips), str(summary.encoded), str(summary.reused), str(summary.kept),
                      str(summary.rejected))
    console.print(table)
    if result.rejects:
        rejects = Table(title="rejected files")
        for column in ("dataset", "path", "stage", "reason"):
            rejects.add_column(column)
        for reject in result.rejects:
            rejects.add_row(reject.dataset, reject.path, reject.stage, reject.reason)
        console.print(rejects)
    committed = f"committed {result.commit}" if result.commit else "nothing new: no commit written"
    console.print(f"{committed} ({result.seconds:.1f} s)")
    if result.pruned_commit:
        console.print(f"pruned: all earlier commits replaced by {result.pruned_commit}")


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
