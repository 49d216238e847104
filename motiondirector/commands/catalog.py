"""`motiondirector catalog ls|show|search|add|rm|reindex|verify|gc`: the LoRA catalog (docs/catalog.md)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from motiondirector.commands.common import (
    CatalogOption,
    ExitCode,
    JsonOption,
    console,
    fail,
    print_json,
    reported_errors,
)

if TYPE_CHECKING:
    from motiondirector.api import Catalog, Manifest, Page

# Columns `catalog ls` adds to id, name, kind, concept and base, with the terminal width each needs.
OPTIONAL_COLUMNS = (("created", 100), ("rank", 140), ("step", 140), ("tags", 140), ("metrics", 140))

catalog_app = typer.Typer(no_args_is_help=True, help="The LoRA catalog: list, search, add, remove, verify.")

KindOption = Annotated[str | None, typer.Option("--kind", help="temporal (motion) or spatial (appearance).")]
ConceptOption = Annotated[str | None, typer.Option("--concept", help="Concept, case-insensitive.")]
BaseFilter = Annotated[str | None, typer.Option("--base", help="Base model id or architecture fingerprint.")]
TagOption = Annotated[list[str] | None, typer.Option("--tag", help="Entries with this tag (repeat: all of them).")]
MetricOption = Annotated[list[str] | None, typer.Option(
    "--min-metric", help="NAME=VALUE: entries whose metric NAME is at least VALUE (repeatable).")]
SinceOption = Annotated[str | None, typer.Option("--since", help="Created at or after (ISO date/time, UTC).")]
UntilOption = Annotated[str | None, typer.Option("--until", help="Created before (ISO date/time, UTC).")]
SortOption = Annotated[str, typer.Option(
    "--sort", help="id, name, kind, concept, rank, step, created_at or metrics.NAME; '-' prefix: descending.")]
LimitOption = Annotated[int, typer.Option("--limit", min=0, help="Entries per page.")]
OffsetOption = Annotated[int, typer.Option("--offset", min=0, help="Entries to skip.")]
FromIndexOption = Annotated[bool, typer.Option(
    "--from-index", help="Answer from the index alone (fastest; as of the last reindex).")]


@contextmanager
def _catalog_errors() -> Iterator[None]:
    from motiondirector.api import UnknownEntryError

    with reported_errors():
        try:
            yield
        except UnknownEntryError as error:  # a KeyError, which reported_errors does not know
            raise fail(str(error), ExitCode.BAD_INPUT) from None


def _open(uri: str | None) -> Catalog:
    from motiondirector.api import Catalog

    return Catalog(uri)


def _moment(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected an ISO date or time, e.g. 2025-06-01 or "
                         "2025-06-01T12:00:00Z") from None


def _thresholds(pairs: list[str] | None) -> dict[str, float]:
    thresholds = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            thresholds[name] = float(value)
        except ValueError:
            raise ValueError(f"--min-metric {pair!r}: expected NAME=VALUE, e.g. clip_score=0.3") from None
    return thresholds


def _manifest_json(manifest: Manifest) -> dict[str, Any]:
    return manifest.model_dump(mode="json")


def _base_label(model_id: str) -> str:
    """A local base folder by its name (the full path is in `catalog show` and --json); other ids as given."""
    return Path(model_id).name if Path(model_id).is_absolute() else model_id


def _show_page(catalog: Catalog, page: Page, offset: int, as_json: bool) -> None:
    if as_json:
        print_json({"catalog": catalog.uri, "total": page.total, "offset": offset,
                    "entries": [_manifest_json(m) for m in page.manifests], "invalid": page.invalid})
        return
    # The id, name, kind, concept and base always show (readable at 80 columns); the rest as width allows.
    extra = [column for column, needs in OPTIONAL_COLUMNS if console.width >= needs]
    table = Table(title=f"catalog {catalog.uri}", box=None, pad_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True, min_width=26)  # ids are copied from here: never folded
    table.add_column("name", overflow="fold", min_width=8)
    table.add_column("kind", no_wrap=True)
    table.add_column("concept", overflow="fold", min_width=8)
    table.add_column("base", no_wrap=True, overflow="ellipsis", max_width=16 if not extra else 24)
    for column in extra:
        table.add_column(column, no_wrap=column in ("rank", "step", "created"), overflow="fold",
                         justify="right" if column in ("rank", "step") else "left")
    for m in page.manifests:
        cells = {"created": m.created_at.strftime("%Y-%m-%d %H:%M"), "rank": str(m.rank), "step": str(m.step),
                 "tags": ", ".join(m.tags), "metrics": "\n".join(f"{k}={v:.3g}" for k, v in sorted(m.metrics.items()))}
        table.add_row(m.id, m.name or "", m.kind, m.concept or "", _base_label(m.base.model_id),
                      *(cells[column] for column in extra))
    console.print(table)
    hidden = [column for column, _ in OPTIONAL_COLUMNS if column not in extra]
    if hidden and page.manifests:
        console.print(f"not shown at this width: {', '.join(hidden)} (see `catalog show ID` or --json)",
                      style="dim", highlight=False)
    shown = f"{offset + 1}-{offset + len(page.manifests)}" if page.manifests else "none"
    console.print(f"showing {shown} of {page.total}")
    for catalog_id, error in sorted(page.invalid.items()):
        console.print(f"[yellow]invalid entry[/] {catalog_id}: {error}", highlight=False)


def _list(uri: str | None, text: str | None, kind: str | None, concept: str | None, base: str | None,
          tags: list[str] | None, min_metrics: list[str] | None, since: str | None, until: str | None,
          sort: str, limit: int, offset: int, from_index: bool, as_json: bool) -> None:
    with _catalog_errors():
        catalog = _open(uri)
        page = catalog.page(text=text, kind=kind, concept=concept, base=base, tags=tags or (),
                            min_metrics=_thresholds(min_metrics), created_after=_moment("--since", since),
                            created_before=_moment("--until", until), sort=sort, limit=limit, offset=offset,
                            fresh=not from_index)
    _show_page(catalog, page, offset, as_json)


@catalog_app.command("ls")
def ls(uri: CatalogOption = None, kind: KindOption = None, concept: ConceptOption = None,
       base: BaseFilter = None, tag: TagOption = None, min_metric: MetricOption = None, since: SinceOption = None,
       until: UntilOption = None, sort: SortOption = "-id", limit: LimitOption = 50, offset: OffsetOption = 0,
       from_index: FromIndexOption = False, as_json: JsonOption = False) -> None:
    """List entries (newest first), filtered, sorted and paginated. Invalid entries are reported."""
    _list(uri, None, kind, concept, base, tag, min_metric, since, until, sort, limit, offset, from_index,
          as_json)


@catalog_app.command("search")
def search(text: Annotated[str, typer.Argument(help="Substring of name, concept, captions or description.")],
           uri: CatalogOption = None, kind: KindOption = None, concept: ConceptOption = None,
           base: BaseFilter = None, tag: TagOption = None, min_metric: MetricOption = None,
           since: SinceOption = None, until: UntilOption = None, sort: SortOption = "-id",
           limit: LimitOption = 50, offset: OffsetOption = 0, from_index: FromIndexOption = False,
           as_json: JsonOption = False) -> None:
    """Entries whose name, concept, captions or description contain TEXT (case-insensitive)."""
    _list(uri, text, kind, concept, base, tag, min_metric, since, until, sort, limit, offset, from_index,
          as_json)


@catalog_app.command("show")
def show(entry_id: Annotated[str, typer.Argument(metavar="ID")], uri: CatalogOption = None,
         as_json: JsonOption = False) -> None:
    """Everything the manifest of entry ID says."""
    with _catalog_errors():
        catalog = _open(uri)
        manifest = catalog.get(entry_id)
    if as_json:
        print_json(_manifest_json(manifest))
        return
    table = Table(title=f"{manifest.id} in {catalog.uri}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in _manifest_json(manifest).items():
        if field == "sha256":
            value = "\n".join(f"{name}  {digest[:16]}…" for name, digest in value.items())
        elif isinstance(value, (dict, list)):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else \
                ", ".join(map(str, value))
        table.add_row(field, "" if value is None else str(value))
    console.print(table)


@catalog_app.command("add")
def add(
    package: Annotated[Path, typer.Argument(metavar="PKG", help="A LoRA package folder, a finished run folder "
                                            "(registers all its LoRAs under one run id) or RUN@step-<n>.")],
    uri: CatalogOption = None,
    name: Annotated[str | None, typer.Option("--name", help="Display name (runs: a prefix).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")] = None,
    description: Annotated[str | None, typer.Option("--description")] = None,
    preview: Annotated[Path | None, typer.Option("--preview", help="A gif shown with a package "
                                                 "(runs: the newest gif in samples/).")] = None,
    dedupe: Annotated[bool, typer.Option("--dedupe", help="Return the existing entry when one has "
                                         "byte-identical package files.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Register a LoRA package (or a run's packages) under new ids; files first, manifest last."""
    from motiondirector.api import is_run_folder, register_run

    with _catalog_errors(), console.status(f"copying {package} into the catalog"):
        catalog = _open(uri)
        if is_run_folder(package):
            if preview is not None:
                raise ValueError("--preview applies to a single package; a run's preview is its newest "
                                 "sample gif")
            added = register_run(catalog, package, name=name, tags=tag or (), description=description,
                                 dedupe=dedupe)
        else:
            added = [catalog.add(package, name=name, tags=tag or (), description=description, preview=preview,
                               dedupe=dedupe)]
    if as_json:
        print_json([_manifest_json(m) for m in added])
        return
    for manifest in added:
        console.print(f"{manifest.id}  {manifest.kind:8}  {manifest.name}", highlight=False)


@catalog_app.command("rm")
def rm(entry_id: Annotated[str, typer.Argument(metavar="ID")], uri: CatalogOption = None,
       as_json: JsonOption = False) -> None:
    """Remove entry ID (its manifest first, so it is never half visible)."""
    with _catalog_errors():
        _open(uri).remove(entry_id)
    if as_json:
        print_json({"removed": entry_id})
    else:
        console.print(f"removed {entry_id}", highlight=False)


@catalog_app.command("reindex")
def reindex(uri: CatalogOption = None,
            full: Annotated[bool, typer.Option("--full", help="Rebuild from the manifests alone.")] = False,
            as_json: JsonOption = False) -> None:
    """Bring the Parquet index up to date (committed ids minus indexed ids; safe to run concurrently)."""
    with _catalog_errors(), console.status("reading new manifests and writing the index"):
        report = _open(uri).reindex(full=full)
    if as_json:
        print_json(asdict(report))
    else:
        state = "written" if report.written else "already up to date"
        console.print(f"index {report.index_file} {state}: {report.rows} entries "
                      f"(+{report.added} new, -{report.dropped} removed)", highlight=False)


@catalog_app.command("verify")
def verify(uri: CatalogOption = None, as_json: JsonOption = False) -> None:
    """Re-hash every file of every entry; list missing or corrupted files; exit 1 if there are any."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with _catalog_errors():
        catalog = _open(uri)
        with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), console=console,
                      transient=True) as progress:
            task = progress.add_task("verify", total=None)
            report = catalog.verify(lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        print_json({"catalog": catalog.uri, "ok": report.ok, "entries": report.entries, "files": report.files,
                    "problems": [asdict(problem) for problem in report.problems]})
    else:
        console.print(f"checked {report.entries} entries, {report.files} files", highlight=False)
        if report.problems:
            table = Table(title="problems")
            for column in ("entry", "kind", "path", "detail"):
                table.add_column(column, overflow="fold")
            for problem in report.problems:
                table.add_row(problem.entry or "(index)", problem.kind, problem.path, problem.detail)
            console.print(table)
    if not report.ok:
        raise typer.Exit(int(ExitCode.FAILED))


@catalog_app.command("gc")
def gc(uri: CatalogOption = None,
       grace: Annotated[float, typer.Option("--grace", min=0, help="Seconds an uncommitted folder may age "
                                            "before it counts as abandoned (longer than any upload).")] = 3600.0,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
       as_json: JsonOption = False) -> None:
    """Remove folders that never got a manifest (crashed writers) and superseded index files."""
    with _catalog_errors(), console.status("looking for abandoned folders"):
        report = _open(uri).gc(grace, dry_run=dry_run)
    if as_json:
        print_json({**asdict(report), "dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.removed_entries)} uncommitted entries, "
                  f"{len(report.removed_index_files)} index files; {len(report.pending)} younger than "
                  f"the grace period kept", highlight=False)
    for catalog_id in report.removed_entries:
        console.print(f"  {catalog_id}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(catalog_app, name="catalog")
