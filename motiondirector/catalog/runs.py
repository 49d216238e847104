"""Registering a training run's LoRAs: its temporal and spatial packages, sharing one run id."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from motiondirector.catalog.catalog import Catalog
from motiondirector.catalog.ids import new_id
from motiondirector.lora.package import MANIFEST, Manifest, PackageError
from motiondirector.train.layout import RunLayout, split_reference


def run_packages(layout: RunLayout) -> list[tuple[str, Path]]:
    """(label, folder) of each complete package of a run or checkpoint: temporal first, then spatial."""
    packages = [("temporal", layout.temporal)] if (layout.temporal / MANIFEST).exists() else []
    packages += [(f"spatial-{k}", layout.spatial(k)) for k in layout.spatial_indices()
                 if (layout.spatial(k) / MANIFEST).exists()]
    return packages


def newest_preview(layout: RunLayout) -> Path | None:
    if not layout.samples.is_dir():
        return None
    gifs = [path for path in layout.samples.glob("*.gif") if path.is_file()]
    return max(gifs, key=lambda path: (path.stat().st_mtime, path.name), default=None)


def is_run_folder(path: str | os.PathLike) -> bool:
    root, _ = split_reference(str(path))
    layout = RunLayout(root)
    return layout.temporal.is_dir() or (root / "spatial").is_dir() or layout.summary.exists()


def register_run(catalog: Catalog, run_folder: str | os.PathLike, *, name: str | None = None,
                 tags: Iterable[str] = (), description: str | None = None, lineage: Iterable[str] = (),
                 dedupe: bool = False) -> list[Manifest]:
    """Add a finished run's packages (or a checkpoint's, as `RUN@step-<n>`) under one new run id.

    Names are `<name or run folder name>-temporal` / `-spatial-<k>`; the preview of every entry is
    the newest gif in the run's samples/. Each entry commits on its own: a crash part-way leaves
    the entries already added, all complete.
    """
    root, step = split_reference(str(run_folder))
    run = RunLayout(root)
    if step is None:
        if not run.summary.exists():
            raise PackageError(f"{root}: not a finished run ({run.summary.name} is missing); "
                               "register a checkpoint as RUN@step-<n>")
        layout = run
    else:
        if step not in run.checkpoint_steps():
            raise PackageError(f"{root}: has no complete checkpoint step-{step} "
                               f"(complete: {run.checkpoint_steps() or 'none'})")
        layout = run.checkpoint(step)
    packages = run_packages(layout)
    if not packages:
        raise PackageError(f"{layout.root}: holds no LoRA package (looked in temporal/ and spatial/<k>/)")
    base_name = name or (root.name if step is None else f"{root.name}-step-{step}")
    run_id, preview, tags, lineage = new_id(), newest_preview(run), list(tags), list(lineage)
    return [catalog.add(folder, name=f"{base_name}-{label}", tags=tags, description=description,
                        run_id=run_id, lineage=lineage, preview=preview, dedupe=dedupe)
            for label, folder in packages]
