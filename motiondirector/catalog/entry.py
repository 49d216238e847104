"""What makes a catalog entry valid, and the errors a reader can meet."""

from __future__ import annotations

from pathlib import PurePosixPath

from motiondirector.lora.package import MANIFEST, Manifest, PackageError, parse_manifest


class UnknownEntryError(KeyError):
    """No committed entry has this id."""

    def __str__(self) -> str:  # KeyError would show the message quoted like a dict key
        return str(self.args[0]) if self.args else "unknown catalog entry"


class CorruptEntryError(PackageError):
    """An entry's files are missing or differ from the hashes its manifest recorded."""


def check_relative(name: str, source: str) -> str:
    """A file name inside an entry: relative, no `..`, no empty parts — it cannot point outside."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or any(part in ("..", ".") for part in parts) \
            or "/".join(parts) != name:
        raise PackageError(f"{source}: file name {name!r} is not a plain relative path inside the entry")
    return name


def parse_entry(catalog_id: str, data: bytes, source: str) -> Manifest:
    """The manifest of entry `catalog_id`, or PackageError saying why it is not a valid entry."""
    manifest = parse_manifest(data, source=source)
    if manifest.id != catalog_id:
        raise PackageError(f"{source}: manifest id {manifest.id!r} does not match its folder {catalog_id}")
    if not manifest.sha256:
        raise PackageError(f"{source}: manifest records no file hashes")
    for name in manifest.sha256:
        if name == MANIFEST:
            raise PackageError(f"{source}: the manifest cannot hash itself")
        check_relative(name, source)
    if manifest.preview is not None and manifest.preview not in manifest.sha256:
        raise PackageError(f"{source}: preview {manifest.preview!r} is not one of the entry's hashed files")
    return manifest
