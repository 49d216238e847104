"""Storage: the floor everything that writes or locates files stands on.

- Locations: `is_url`, `is_local`, `normalize` / `local_path` — the one way a model id, LoRA reference,
  data source, output or catalog root is decided local-or-URL. Local spellings are normalised
  (`~` expanded, made absolute) so `~/m` and `/home/me/m` name the same thing; URLs stay as given.
- Roots: `cache_root` ($MOTIONDIRECTOR_CACHE) and `catalog_root` ($MOTIONDIRECTOR_CATALOG).
- Writing so that readers never see a part: `atomic_write` (a local file: temp name in the same
  folder, then `os.replace`), `atomic_output` (the same for writers that need a path), `publish` (any
  fsspec filesystem: the local rename, or a single PUT on object stores — a PUT is all-or-nothing
  there, and they have no rename), `staged_folder` (build a folder under a temp name, rename it into
  place on success, remove it on failure).
- `sha256_file`: the chunked content hash of a file on any fsspec filesystem.

Imports nothing from the rest of motiondirector.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

CACHE_ENV = "MOTIONDIRECTOR_CACHE"
CATALOG_ENV = "MOTIONDIRECTOR_CATALOG"
DEFAULT_CACHE = "~/.cache/motiondirector"
DEFAULT_CATALOG = "~/.cache/motiondirector/catalog"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 1 << 20


# --- locations ------------------------------------------------------------------------------------
def is_url(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3://, gs://, memory://, file://, ...); False for a plain path."""
    return bool(_SCHEME.match(os.fspath(location)))


def is_local(location: str | os.PathLike) -> bool:
    """A path on this machine's filesystem: a plain path or a file:// URL."""
    text = os.fspath(location)
    return not is_url(text) or text.startswith("file://")


def normalize(location: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> str:
    """URLs as given; a local path with `~` expanded, made absolute (against `relative_to`, default the
    working directory) and normalised (no `..`, no trailing `/`). Symlinks are not resolved."""
    text = os.fspath(location)
    if is_url(text):
        return text
    path = os.path.expanduser(text)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser(os.fspath(relative_to)) if relative_to is not None else os.getcwd(),
                            path)
    return os.path.abspath(path)


def local_path(location: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> Path:
    """`normalize` of a local path, as a Path; a URL is refused (ValueError)."""
    text = os.fspath(location)
    if is_url(text):
        if not text.startswith("file://"):
            raise ValueError(f"{text}: a local path is needed here, not a URL")
        text = text[len("file://"):]
    return Path(normalize(text, relative_to))


# --- roots ----------------------------------------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $MOTIONDIRECTOR_CACHE, else ~/.cache/motiondirector (always local)."""
    return local_path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def catalog_root(uri: str | os.PathLike | None = None) -> str:
    """`uri`, else $MOTIONDIRECTOR_CATALOG, else ~/.cache/motiondirector/catalog (a URL or a normalised path)."""
    return normalize(uri or os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG)


# --- writing ----------------------------------------------------------------------------------------
@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path next to `path` to write to; renamed onto `path` on success, removed on failure.

    The file is made readable by others (0644) like a normally created file, not private as
    mkstemp leaves it: published files are read by other users and services.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file under a temp name in the same folder, then rename: never seen partly written.

    The folder must exist (writing into a folder that vanished is an error, not something to hide).
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def publish(location: str, data: bytes, fs: AbstractFileSystem | None = None) -> None:
    """Make `location` appear with all of `data` or not change, on any fsspec filesystem.

    Local: parent folders are created, then `atomic_write`. Elsewhere (object stores have no
    rename): one `pipe_file`, a single PUT, which readers see entirely or not at all.
    `location` is a path on `fs` when `fs` is given, else a URL or local path.
    """
    if fs is None:
        from fsspec.core import url_to_fs

        fs, location = url_to_fs(location)
    if _is_local_fs(fs):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(location, data)
    else:
        fs.pipe_file(location, data)


def _is_local_fs(fs: AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


@contextmanager
def staged_folder(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temp name next to `target`, then rename it into place in one step.

    Yields the (empty, 0755) staging folder. On an exception it is removed and nothing changes.
    On success it becomes `target`:
    - an absent or empty `target` is replaced;
    - an existing `target` is replaced when `replace` (moved aside, the new one renamed in, the old
      one deleted: readers see the old folder, briefly none, then the new one — never a mix);
    - otherwise the existing `target` wins (another process built the same thing first) and the
      staging folder is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; published folders are ordinary folders
        yield staging
        _rename_into_place(staging, target, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left when it was renamed


def _rename_into_place(staging: Path, target: Path, replace: bool) -> None:
    if replace and target.exists():
        aside = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)  # put the old folder back: a failed swap changes nothing
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.replace(staging, target)  # replaces an empty folder too (POSIX rename)
    except OSError:
        if not target.exists():
            raise
        # A concurrent writer's complete folder is in place: keep it, drop ours.


# --- hashing ----------------------------------------------------------------------------------------
def sha256_file(location: str | os.PathLike, fs: AbstractFileSystem | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; a path on `fs`, else a local path or URL."""
    digest = hashlib.sha256()
    if fs is None and is_url(location):
        from fsspec.core import url_to_fs

        fs, location = url_to_fs(os.fspath(location))
    with (fs.open(location, "rb") if fs is not None else open(location, "rb")) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
