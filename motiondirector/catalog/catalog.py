"""The catalog: LoRA packages on any fsspec storage, found by id or by query (docs/catalog.md).

Writers never coordinate: each entry gets a fresh random id, its files are written first and its
manifest last, so a crashed writer leaves only an uncommitted folder that readers ignore and `gc`
removes. Readers trust committed manifests only; the Parquet index just makes them fast to query.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from motiondirector.catalog import index
from motiondirector.catalog.entry import CorruptEntryError, UnknownEntryError, check_relative, parse_entry
from motiondirector.catalog.ids import new_id, validate_id
from motiondirector.catalog.store import Store
from motiondirector.lora.package import MANIFEST, Manifest, PackageError, read_package
from motiondirector.storage import cache_root, catalog_root, sha256_file, staged_folder

if TYPE_CHECKING:
    from motiondirector.catalog.maintenance import GcReport, VerifyReport

@dataclass(frozen=True)
class Page:
    manifests: list[Manifest]  # this page of the matching entries, in order
    total: int  # matching entries on all pages
    invalid: dict[str, str]  # every committed entry whose manifest is rejected: id -> why


@dataclass(frozen=True)
class ReindexReport:
    index_file: str
    rows: int
    added: int  # committed entries that were not in the previous index
    dropped: int  # indexed entries that are no longer committed
    written: bool  # False when the previous index was already exact


@dataclass(frozen=True)
class LoadedIndex:
    file: str | None  # None: no index written yet
    table: pa.Table
    ids: frozenset[str]

    @classmethod
    def of(cls, file: str | None, table: pa.Table) -> LoadedIndex:
        return cls(file, table, frozenset(table["id"].to_pylist()))


class Catalog:
    def __init__(self, uri: str | os.PathLike | None = None, *,
                 resolve_cache: str | os.PathLike | None = None):
        self.uri = catalog_root(uri)
        self.store = Store(self.uri)
        # Where `resolve` puts local copies of entries of a remote catalog; default <cache root>/resolved.
        self._resolve_cache = resolve_cache
        self._loaded_index: LoadedIndex | None = None  # the snapshot last read, while the pointer names it

    def __repr__(self) -> str:
        return f"Catalog({self.uri!r})"

    # ---- writing -------------------------------------------------------------------------------

    def add(self, package_folder: str | os.PathLike, *, name: str | None = None, tags: Iterable[str] = (),
            description: str | None = None, run_id: str | None = None, lineage: Iterable[str] = (),
            preview: str | os.PathLike | None = None, dedupe: bool = False) -> Manifest:
        """Register a copy of a LoRA package; returns its manifest with the catalog fields filled.

        Explicit arguments override what the package's manifest already says (tags are merged).
        With `dedupe`, a package whose files equal an existing entry's returns that entry instead.
        """
        folder = Path(package_folder)
        source, _ = read_package(folder)  # only complete, self-consistent packages get in
        files = _package_files(folder)
        hashes = {relative: sha256_file(path) for relative, path in files.items()}
        if dedupe:
            existing = self._with_content(index.content_digest(hashes))
            if existing is not None:
                return existing
        preview_name = None
        if preview is not None:
            preview = Path(preview)
            if not preview.is_file():
                raise PackageError(f"{preview}: preview file not found")
            preview_name = f"preview{preview.suffix.lower()}"
            if preview_name in files:
                raise PackageError(f"{folder}: already holds a file named {preview_name}")
            files[preview_name] = preview
            hashes[preview_name] = sha256_file(preview)
        catalog_id = new_id()
        manifest = Manifest.model_validate({
            **source.model_dump(),
            "id": catalog_id,
            "name": name or source.name or source.concept or folder.name,
            "sha256": hashes,
            "preview": preview_name,
            "run_id": run_id if run_id is not None else source.run_id,
            "lineage": [validate_id(parent) for parent in (list(lineage) or source.lineage)],
            "tags": _clean_tags([*source.tags, *tags]),
            "description": description if description is not None else source.description,
        })
        entry = self.store.entry(catalog_id)
        self.store.upload({f"{entry}/{relative}": path for relative, path in files.items()})
        self._commit(manifest)
        return manifest

    def _commit(self, manifest: Manifest) -> None:
        """Make a fully written entry visible: its manifest, in one atomic write, last."""
        entry = self.store.entry(manifest.id)
        missing = set(manifest.sha256) - set(self.store.files(entry))
        if missing:  # e.g. `gc` with a grace shorter than this upload took
            raise PackageError(f"{entry}: {sorted(missing)} disappeared while the entry was written; "
                               "not committing it")
        self.store.write_atomic(self.store.manifest(manifest.id), manifest.model_dump_json(indent=2).encode())

    def remove(self, catalog_id: str) -> None:
        """Uncommit first, then delete the files: never a half-visible entry."""
        self._manifest_bytes(catalog_id)  # unknown id -> UnknownEntryError; S3 deletes silently
        self.store.remove_entry(catalog_id)

    # ---- reading one entry ---------------------------------------------------------------------

    def _manifest_bytes(self, catalog_id: str) -> bytes:
        try:
            return self.store.read_bytes(self.store.manifest(catalog_id))
        except FileNotFoundError:
            raise UnknownEntryError(f"{catalog_id}: no such entry in catalog {self.uri}") from None

    def get(self, catalog_id: str) -> Manifest:
        data = self._manifest_bytes(catalog_id)
        return parse_entry(catalog_id, data, source=self.store.manifest(catalog_id))

    def resolve(self, catalog_id: str, *, verify: bool = True) -> Path:
        """A local folder holding the entry's package, its files checked against the manifest hashes.

        A local catalog answers with the entry folder itself; a remote one downloads the entry once
        into the resolve cache (keyed by id and content hash, complete or absent), by default
        `$MOTIONDIRECTOR_CACHE/resolved` (~/.cache/motiondirector/resolved).
        """
        manifest = self.get(catalog_id)
        if self.store.is_local:
            folder = Path(self.store.entry(catalog_id))
            if verify:
                _check_hashes(folder, manifest)
            return folder
        cache = self._resolve_cache_dir()
        target = cache / f"{catalog_id}-{index.content_digest(manifest.sha256)[:16]}"
        if (target / MANIFEST).exists():
            return target  # only ever appears complete and verified (renamed into place below)
        # A concurrent resolver's complete copy, if it wins the rename, is as good as ours.
        with staged_folder(target) as staging:
            for relative in manifest.sha256:
                source = f"{self.store.entry(catalog_id)}/{relative}"
                try:
                    self.store.download(source, staging / relative)
                except FileNotFoundError:
                    raise CorruptEntryError(f"{source}: missing (entry {catalog_id})") from None
            _check_hashes(staging, manifest)
            (staging / MANIFEST).write_bytes(manifest.model_dump_json(indent=2).encode())
        return target

    def _resolve_cache_dir(self) -> Path:
        if self._resolve_cache is not None:
            return cache_root(self._resolve_cache)
        return cache_root() / "resolved"

    # ---- queries -------------------------------------------------------------------------------

    def page(self, *, concept: str | None = None, kind: str | None = None, base: str | None = None,
             tags: Iterable[str] = (), min_metrics: Mapping[str, float] | None = None,
             created_after: datetime | None = None, created_before: datetime | None = None,
             text: str | None = None, sort: str = "-id", limit: int | None = None, offset: int = 0,
             fresh: bool = True) -> Page:
        """Entries matching every given filter, sorted (default: newest first) and paginated.

        `fresh` merges the index with the store's current listing (exact, one listing per call);
        `fresh=False` answers from the last index snapshot alone (fastest, as of the last reindex).
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset ({offset}) and limit ({limit}) must not be negative")
        filters = index.Filters(concept=concept, kind=kind, base=base, tags=tuple(tags),
                                min_metrics=dict(min_metrics or {}), created_after=created_after,
                                created_before=created_before, text=text)
        table = self._snapshot(fresh)
        matching = index.order(index.select(table, filters), sort)
        return Page(manifests=index.manifests(matching.slice(offset, limit)), total=matching.num_rows,
                    invalid=_invalid_entries(table))

    def query(self, **options: Any) -> list[Manifest]:
        """The manifests of `page(**options)`."""
        return self.page(**options).manifests

    list = query  # `catalog.list(...)` reads naturally at call sites

    def invalid_entries(self) -> dict[str, str]:
        """Committed entries whose manifest is rejected: id -> why."""
        return _invalid_entries(self._snapshot(fresh=True))

    def _with_content(self, digest: str) -> Manifest | None:
        table = self._snapshot(fresh=True)
        same = table.filter(pc.fill_null(pc.equal(table["content_sha256"], digest), False))
        found = index.manifests(index.order(same, "id").slice(0, 1))
        return found[0] if found else None

    # ---- index ---------------------------------------------------------------------------------

    def reindex(self, *, full: bool = False) -> ReindexReport:
        """Bring the index up to date by the set difference of committed and indexed ids.

        `full` rebuilds from the manifests alone (e.g. after editing a manifest by hand).
        """
        previous = LoadedIndex.of(None, index.empty_table()) if full else self._read_index()
        committed = self.committed_ids()  # exact: every manifest checked, nothing assumed
        table = self._merge(previous, committed)
        added, dropped = len(committed - previous.ids), len(previous.ids - committed)
        if previous.file is not None and not added and not dropped:
            return ReindexReport(previous.file, table.num_rows, 0, 0, written=False)
        name = f"{new_id()}.parquet"
        # Snapshot first, pointer second: the pointer never names a file that is not all there.
        self.store.write_atomic(f"{self.store.index_dir}/{name}", index.to_parquet(table))
        self.store.write_atomic(self.store.pointer, index.pointer_bytes(name, table.num_rows))
        self._loaded_index = LoadedIndex.of(name, table)
        return ReindexReport(name, table.num_rows, added, dropped, written=True)

    def current_index_file(self) -> str | None:
        try:
            return index.pointer_target(self.store.read_bytes(self.store.pointer))
        except FileNotFoundError:
            return None

    def _read_index(self) -> LoadedIndex:
        """The snapshot the pointer names (cached while the pointer does not move), or an empty one."""
        for _ in range(2):  # the snapshot may be replaced and collected between the two reads
            target = self.current_index_file()
            if target is None:
                break
            if self._loaded_index is not None and self._loaded_index.file == target:
                return self._loaded_index
            try:
                data = self.store.read_bytes(f"{self.store.index_dir}/{target}")
            except FileNotFoundError:
                continue
            table = index.from_parquet(data)
            if table is None:
                break
            self._loaded_index = LoadedIndex.of(target, table)
            return self._loaded_index
        return LoadedIndex.of(None, index.empty_table())

    def committed_ids(self) -> set[str]:
        return {catalog_id for catalog_id, committed in self.store.entry_ids().items() if committed}

    def _snapshot(self, fresh: bool) -> pa.Table:
        """One row per committed entry (rejected manifests included, with their error)."""
        loaded = self._read_index()
        if not fresh:
            return loaded.table
        listing = self.store.entry_ids(known_committed=loaded.ids)
        return self._merge(loaded, {catalog_id for catalog_id, committed in listing.items() if committed})

    def _merge(self, loaded: LoadedIndex, committed: set[str]) -> pa.Table:
        """The snapshot minus entries no longer committed, plus committed entries it lacks."""
        table = loaded.table
        if not loaded.ids <= committed:
            table = table.filter(pc.is_in(table["id"], value_set=pa.array(sorted(committed), pa.string())))
        unindexed = committed - loaded.ids
        return pa.concat_tables([table, self._rows(sorted(unindexed))]) if unindexed else table

    def _rows(self, catalog_ids: list[str]) -> pa.Table:
        paths = {self.store.manifest(catalog_id): catalog_id for catalog_id in catalog_ids}
        rows = []
        for path, data in self.store.read_many(paths).items():
            if isinstance(data, FileNotFoundError):
                continue  # removed since the listing
            if isinstance(data, Exception):
                raise data  # a read failure is not a verdict on the entry: do not index it as invalid
            try:
                rows.append(index.manifest_row(parse_entry(paths[path], data, source=path)))
            except PackageError as error:
                rows.append(index.invalid_row(paths[path], str(error)))
        return index.rows_table(rows)

    # ---- maintenance ---------------------------------------------------------------------------

    def verify(self, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Re-hash every file of every committed entry; `progress(done, total)` after each entry."""
        from motiondirector.catalog.maintenance import verify

        return verify(self, progress)

    def gc(self, grace_seconds: float = 3600.0, *, dry_run: bool = False) -> GcReport:
        """Remove uncommitted folders and stale index files older than the grace period."""
        from motiondirector.catalog.maintenance import collect_garbage

        return collect_garbage(self, grace_seconds, dry_run=dry_run)


def _package_files(folder: Path) -> dict[str, Path]:
    """The package's files to copy: all but the manifest (rewritten) and hidden temp files."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative != MANIFEST and not any(part.startswith(".") for part in path.parts[
                len(folder.parts):]):
            files[check_relative(relative, str(folder))] = path
    return files


def _clean_tags(tags: Iterable[str]) -> list[str]:
    cleaned = []
    for tag in tags:
        tag = tag.strip()
        if tag and tag not in cleaned:
            cleaned.append(tag)
    return cleaned


def _check_hashes(folder: Path, manifest: Manifest) -> None:
    for relative, expected in manifest.sha256.items():
        path = folder / relative
        if not path.is_file():
            raise CorruptEntryError(f"{path}: missing (entry {manifest.id})")
        if sha256_file(path) != expected:
            raise CorruptEntryError(f"{path}: content differs from its recorded sha256 (entry {manifest.id}); "
                                    "run `motiondirector catalog verify`")


def _invalid_entries(table: pa.Table) -> dict[str, str]:
    rejected = table.filter(pc.is_valid(table["error"]))
    return dict(zip(rejected["id"].to_pylist(), rejected["error"].to_pylist(), strict=True))
