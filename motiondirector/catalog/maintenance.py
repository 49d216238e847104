"""Catalog upkeep: `verify` re-hashes committed entries, `gc` removes what crashed writers left."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from motiondirector.catalog.entry import parse_entry
from motiondirector.catalog.ids import id_time, is_catalog_id
from motiondirector.catalog.index import pointer_target
from motiondirector.catalog.store import POINTER, modified_at
from motiondirector.lora.package import PackageError

if TYPE_CHECKING:
    from motiondirector.catalog.catalog import Catalog

ProblemKind = Literal["missing", "corrupted", "invalid-manifest", "index"]


@dataclass(frozen=True)
class Problem:
    entry: str | None  # catalog id; None for a problem of the index
    kind: ProblemKind
    path: str
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    entries: int  # committed entries checked
    files: int  # files re-hashed
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(catalog: Catalog, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    store = catalog.store
    committed = sorted(catalog.committed_ids())
    manifests = store.read_many(store.manifest(catalog_id) for catalog_id in committed)
    problems: list[Problem] = []
    hashed = 0
    for done, catalog_id in enumerate(committed, start=1):
        path = store.manifest(catalog_id)
        data = manifests[path]
        if isinstance(data, FileNotFoundError):
            continue  # removed while we were checking
        if isinstance(data, Exception):
            raise data
        try:
            manifest = parse_entry(catalog_id, data, source=path)
        except PackageError as error:
            problems.append(Problem(catalog_id, "invalid-manifest", path, str(error)))
            continue
        for relative, expected in manifest.sha256.items():
            file_path = f"{store.entry(catalog_id)}/{relative}"
            try:
                actual = store.sha256(file_path)
            except FileNotFoundError:
                problems.append(Problem(catalog_id, "missing", file_path, "listed in the manifest, not stored"))
                continue
            hashed += 1
            if actual != expected:
                problems.append(Problem(catalog_id, "corrupted", file_path,
                                        f"sha256 {actual[:16]}… but the manifest recorded {expected[:16]}…"))
        if progress is not None:
            progress(done, len(committed))
    problems.extend(_index_problems(catalog))
    return VerifyReport(entries=len(committed), files=hashed, problems=problems)


def _index_problems(catalog: Catalog) -> list[Problem]:
    store = catalog.store
    try:
        pointer = store.read_bytes(store.pointer)
    except FileNotFoundError:
        return []  # never indexed: queries read the manifests
    target = pointer_target(pointer)
    if target is None:
        return [Problem(None, "index", store.pointer, "unreadable pointer; run `catalog reindex --full`")]
    try:
        store.read_bytes(f"{store.index_dir}/{target}")
    except FileNotFoundError:
        return [Problem(None, "index", f"{store.index_dir}/{target}",
                        "the pointer names a missing snapshot; run `catalog reindex --full`")]
    return []


@dataclass(frozen=True)
class GcReport:
    removed_entries: list[str]  # uncommitted entry folders and cut-short local removals (or, dry_run: to remove)
    removed_index_files: list[str]  # superseded index snapshots and stray temp files
    pending: list[str]  # uncommitted entries younger than the grace period: a writer may be busy


def collect_garbage(catalog: Catalog, grace_seconds: float, *, dry_run: bool = False) -> GcReport:
    """Remove uncommitted entry folders and unreferenced index files older than `grace_seconds`.

    Age counts from the later of the id's time and the newest file's modification time (where the
    store reports one), so a writer still uploading keeps its folder. `grace_seconds` must exceed
    the longest upload of one entry; `add` refuses to commit an entry that lost files meanwhile.
    """
    if grace_seconds < 0:
        raise ValueError(f"grace period must not be negative, got {grace_seconds}")
    store = catalog.store
    now = time.time()
    removed, pending = [], []
    for catalog_id, committed in sorted(store.entry_ids().items()):
        if committed:
            continue
        entry = store.entry(catalog_id)
        times = [modified_at(info) for info in store.files(entry).values()]
        newest = max([id_time(catalog_id).timestamp(), *(t for t in times if t is not None)])
        if now - newest < grace_seconds:
            pending.append(catalog_id)
            continue
        if _committed_since(catalog, catalog_id):
            continue  # its writer finished between the listing and now
        if not dry_run:
            store.remove_tree(entry)
        removed.append(catalog_id)

    for leftover in store.removal_leftovers():  # removed entries whose deletion was cut short
        if not dry_run:
            store.remove_tree(leftover)
        removed.append(leftover.rsplit("/", 1)[-1])

    current = catalog.current_index_file()
    stale = []
    for name, info in sorted(store.files(store.index_dir).items()):
        if name in (POINTER, current) or "/" in name:
            continue
        stem = name.removesuffix(".parquet")
        born = id_time(stem).timestamp() if is_catalog_id(stem) else modified_at(info)
        if born is not None and now - born >= grace_seconds:
            if not dry_run:
                store.remove_file(f"{store.index_dir}/{name}")
            stale.append(name)
    return GcReport(removed_entries=removed, removed_index_files=stale, pending=pending)


def _committed_since(catalog: Catalog, catalog_id: str) -> bool:
    try:
        catalog.store.read_bytes(catalog.store.manifest(catalog_id))
    except FileNotFoundError:
        return False
    return True
