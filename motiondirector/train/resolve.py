"""LORA references: turn what a user types after --motion / --appearance into a package folder.

A reference is one of
    PKG                 a package folder (has manifest.json)
    RUN                 a training run folder: its temporal package for a motion; for an appearance
                        its only spatial package (a run with several names one: RUN/spatial/<k>)
    RUN/spatial/<k>     is itself a package folder
    RUN@step-<n>        the same inside checkpoint n (RUN@step-<n>/spatial/<k> for one of several)
    ID                  a catalog entry, when a catalog is given (anything that is not a local path)

It lives with the run-folder layout (train/layout.py) because RUN and RUN@step-<n> are that layout;
packages alone (lora/) know nothing of runs. Only the folder is chosen here; whether its kind and
base fit is checked when it is loaded (`package.check_compatible`), so the message can name both
the package and the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from motiondirector.lora.package import MANIFEST, LoraKind, PackageError
from motiondirector.storage import local_path
from motiondirector.train.layout import RunLayout, split_reference

_ROLE = {"temporal": "--motion", "spatial": "--appearance"}


class LoraCatalog(Protocol):
    """What resolution needs from a catalog: an entry id -> a local package folder."""

    def resolve(self, entry_id: str) -> str | Path: ...


def resolve_lora(reference: str | Path, kind: LoraKind, catalog: LoraCatalog | None = None) -> Path:
    """The package folder named by `reference` for a LoRA of `kind` (see the module doc)."""
    text = str(reference)
    if kind not in _ROLE:
        raise ValueError(f"LoRA kind must be 'spatial' or 'temporal', got {kind!r}")
    path, step, inner = _split_checkpoint(text)
    if step is None and not path.exists() and catalog is not None:
        return _catalog_package(catalog, text)
    if step is not None:
        run = RunLayout(path)
        if not path.is_dir():
            raise PackageError(f"{text}: run folder {path} does not exist")
        if step not in run.checkpoint_steps():
            available = ", ".join(f"step-{s}" for s in run.checkpoint_steps()) or "none"
            raise PackageError(f"{text}: {path} has no complete checkpoint step-{step} (available: {available})")
        path = run.checkpoint(step).root / inner if inner else run.checkpoint(step).root
    if not path.exists():
        hint = "" if catalog is not None else " (catalog ids need a catalog: --catalog)"
        raise PackageError(f"{text}: no such package folder, run folder or checkpoint{hint}")
    if (path / MANIFEST).is_file():
        return path
    return _package_in_run(RunLayout(path), kind, text)


def _split_checkpoint(text: str) -> tuple[Path, int | None, str]:
    """`RUN@step-<n>[/spatial/<k>]` -> (RUN, n, 'spatial/<k>'); anything else -> (path, None, '')."""
    if "@" not in text:
        return local_path(text), None, ""
    head, _, tail = text.rpartition("@")
    step_part, _, inner = tail.partition("/")
    try:
        run, step = split_reference(f"{head}@{step_part}")
    except ValueError as error:
        raise PackageError(str(error)) from None
    return local_path(run), step, inner


def _package_in_run(run: RunLayout, kind: LoraKind, text: str) -> Path:
    if kind == "temporal":
        if (run.temporal / MANIFEST).is_file():
            return run.temporal
        raise PackageError(f"{text}: not a LoRA package, and not a run folder with a temporal package "
                           f"({run.temporal / MANIFEST} is missing; an image-only run has no motion)")
    indices = [k for k in run.spatial_indices() if (run.spatial(k) / MANIFEST).is_file()]
    if len(indices) == 1:
        return run.spatial(indices[0])
    if not indices:
        raise PackageError(f"{text}: not a LoRA package, and not a run folder with a spatial package "
                           f"(nothing complete under {run.root / 'spatial'})")
    choices = ", ".join(f"{text}/spatial/{k}" for k in indices)
    raise PackageError(f"{text}: the run has {len(indices)} spatial LoRAs (one per training clip); "
                       f"name one as {_ROLE['spatial']}: {choices}")


def _catalog_package(catalog: LoraCatalog, entry_id: str) -> Path:
    try:
        folder = Path(catalog.resolve(entry_id))
    except (LookupError, ValueError) as error:  # unknown id, or not even shaped like one
        raise PackageError(f"{entry_id}: not a local path, and not an entry of the catalog ({error})") from None
    if not (folder / MANIFEST).is_file():
        raise PackageError(f"catalog entry {entry_id!r} resolved to {folder}, which is not a LoRA package")
    return folder
