"""The storage side of a catalog: a root on any fsspec filesystem and the commit protocol.

    <root>/loras/<id>/...            one LoRA package per entry (adapter files, optional preview)
    <root>/loras/<id>/manifest.json  written LAST: the commit marker — no valid manifest, no entry
    <root>/index/<id>.parquet        index snapshots, each written once under a fresh name
    <root>/index/CURRENT.json        pointer naming the current snapshot, replaced in one step

"Replaced in one step" means temp name + rename on a local disk, and a single PUT on object stores,
which have no rename: a PUT of a small object is all-or-nothing on S3/GCS (readers see the old
object or the new one, never a prefix), and S3/GCS give read-after-write consistency for listings.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from motiondirector.catalog.ids import is_catalog_id, validate_id
from motiondirector.lora.package import MANIFEST
from motiondirector.storage import publish, sha256_file

ENTRIES = "loras"
INDEX = "index"
POINTER = "CURRENT.json"
TRASH_PREFIX = ".removed-"  # local removals rename an entry to this (not an id: invisible at once)


class Store:
    """Paths and primitive operations of one catalog root. Holds no catalog state of its own."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = url_to_fs(uri)
        self.root = self.root.rstrip("/")
        # Only a local disk has an atomic rename; everything else commits with a single put.
        self.is_local = isinstance(self.fs, LocalFileSystem)

    @property
    def entries_dir(self) -> str:
        return f"{self.root}/{ENTRIES}"

    @property
    def index_dir(self) -> str:
        return f"{self.root}/{INDEX}"

    @property
    def pointer(self) -> str:
        return f"{self.index_dir}/{POINTER}"

    def entry(self, catalog_id: str) -> str:
        return f"{self.entries_dir}/{validate_id(catalog_id)}"

    def manifest(self, catalog_id: str) -> str:
        return f"{self.entry(catalog_id)}/{MANIFEST}"

    def _forget_listings(self) -> None:
        # Other processes write concurrently: a cached listing (s3fs keeps one) would hide their entries.
        self.fs.invalidate_cache()

    def entry_ids(self, known_committed: frozenset[str] = frozenset()) -> dict[str, bool]:
        """Every entry folder named by a valid id -> whether it is committed (holds a manifest).

        On a local disk, folders in `known_committed` (e.g. indexed ids) count as committed without a
        stat each: a committed entry loses its manifest only by `remove_entry`, which renames the
        whole folder away in one step. Object stores list every object in one go anyway.
        """
        if self.is_local:
            try:
                names = os.listdir(self.entries_dir)
            except FileNotFoundError:
                return {}
            found = {name: True for name in names if name in known_committed}
            for name in names:
                if name not in found and is_catalog_id(name):
                    found[name] = os.path.exists(f"{self.entries_dir}/{name}/{MANIFEST}")
            return found
        self._forget_listings()
        found: dict[str, bool] = {}
        prefix = self.entries_dir + "/"
        # One recursive listing (paged, no delimiter) instead of one request per entry.
        for path in self.fs.find(self.entries_dir):
            relative = path[len(prefix):] if path.startswith(prefix) else path
            name, _, rest = relative.partition("/")
            if is_catalog_id(name):
                found[name] = found.get(name, False) or rest == MANIFEST
        return found

    def files(self, folder: str) -> dict[str, dict[str, Any]]:
        """Files below `folder` (relative posix path -> fsspec info)."""
        self._forget_listings()
        prefix = folder.rstrip("/") + "/"
        return {path[len(prefix):]: info for path, info in self.fs.find(folder, detail=True).items()
                if path.startswith(prefix)}

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | Exception]:
        """Contents of many small files; object stores fetch them concurrently. Errors are returned."""
        paths = list(paths)
        if not paths:
            return {}
        if self.is_local:
            results: dict[str, bytes | Exception] = {}
            for path in paths:
                try:
                    results[path] = Path(path).read_bytes()
                except OSError as error:
                    results[path] = error
            return results
        return self.fs.cat(paths, on_error="return")

    def write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the old content (or nothing) or all of `data`, never a part."""
        publish(path, data, self.fs)

    def upload(self, files: dict[str, Path]) -> None:
        """Copy local files to their store paths; object stores upload them concurrently."""
        if self.is_local:
            for path, local_path in files.items():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.fs.put_file(str(local_path), path)
        elif files:
            self.fs.put([str(local_path) for local_path in files.values()], list(files))

    def download(self, path: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(path, str(local_path))

    def sha256(self, path: str) -> str:
        return sha256_file(path, self.fs)

    def remove_file(self, path: str) -> None:
        self.fs.rm_file(path)

    def remove_entry(self, catalog_id: str) -> None:
        """Uncommit in one step, then delete: a crash part-way leaves nothing that looks committed."""
        if self.is_local:
            trash = f"{self.entries_dir}/{TRASH_PREFIX}{catalog_id}-{secrets.token_hex(4)}"
            os.rename(self.entry(catalog_id), trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:  # no rename: the manifest goes first, the files after
            self.remove_file(self.manifest(catalog_id))
            self.remove_tree(self.entry(catalog_id))

    def removal_leftovers(self) -> list[str]:
        """Folders of local removals that crashed before deleting them (never visible as entries)."""
        if not self.is_local or not os.path.isdir(self.entries_dir):
            return []
        return sorted(item.path for item in os.scandir(self.entries_dir) if item.name.startswith(TRASH_PREFIX))

    def remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass  # already gone: a concurrent remove or gc got there first
        self._forget_listings()


def modified_at(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict, where the store reports one."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
