"""The public API: the few entry points the CLI, the Ray pipelines, the Serve app and users call.

`pipelines/`, `serve/` and `motiondirector/commands/` import the library only from here, so what
they depend on is this page (docs/api.md has a runnable walk-through):

    from motiondirector import api

    backbone = api.load_backbone("toy")                       # or a diffusers folder / hub id
    config = api.validate_config({"base": "toy", "steps": 20, "data": {...}}, "my config")
    summary = api.train(config, "runs/zigzag", backbone=backbone, observers=[print])
    videos = api.generate(api.GenerationParams(base="toy", prompts=["a blue square ..."],
                          motions=[api.LoraChoice(reference="runs/zigzag")], seed=0), backbone=backbone)
    api.save_video(videos[0], "out/")                         # mp4 + gif + png + sidecar JSON

Importing this module is cheap: each name loads its module on first use (PEP 562), so the fast
catalog commands and the heavy training commands share one surface. `tests/test_api.py` checks that
every listed name resolves.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotations of the functions defined here
    from motiondirector.catalog import Catalog
    from motiondirector.config import TrainConfig
    from motiondirector.lora.package import Manifest
    from motiondirector.train.loop import RunSummary

# name -> the module that defines it, grouped by module.
_MODULES: dict[str, tuple[str, ...]] = {
    "motiondirector.animate": ("animate", "image_appearance"),
    "motiondirector.backbones": ("defaults_for", "load_backbone", "resolve_device"),
    "motiondirector.backbones.base": ("BackboneSpec", "ModelNotAvailableError", "ModelTooLargeError"),
    "motiondirector.backbones.defaults": ("ModelDefaults",),
    "motiondirector.backbones.tiny": ("write_tiny_model",),
    "motiondirector.backbones.unet3d": ("lora_targets",),
    "motiondirector.catalog": ("Catalog", "CatalogOnDemand", "CorruptEntryError", "InvalidIdError", "Page", "UnknownEntryError", "is_run_folder", "register_run", "validate_id"),
    "motiondirector.config": ("ConfigError", "TrainConfig", "apply_overrides", "load_config", "validate_config"),
    "motiondirector.data.cache": ("clear_cache", "list_cache"),
    "motiondirector.data.errors": ("DataError",),
    "motiondirector.data.ingest_plan": ("ClipWork", "RowIndex", "build_records", "decode_works", "plan_works"),
    "motiondirector.data.ingest_read": ("prune", "read_ingested", "read_rejects"),
    "motiondirector.data.ingest_spec": ("IngestDataset", "IngestSpec", "load_ingest_spec"),
    "motiondirector.data.ingest_store": ("DataFile", "DatasetState", "IngestStore", "LiveClip", "Reject", "new_run_id", "write_records"),
    "motiondirector.data.records": ("CacheRecord",),
    "motiondirector.data.sources": ("DatasetSpec", "SourceItem", "list_items"),
    "motiondirector.errors": ("describe_validation_error",),
    "motiondirector.events": ("CheckpointWritten", "Event", "Observer", "Progress", "Recorder", "TrainFinished", "TrainStarted", "TrainStep", "ValidationSample", "emit"),
    "motiondirector.generate": ("GeneratedVideo", "GenerationParams", "HeldComposition", "LoraChoice", "generate", "generate_batch", "package_base", "read_sidecar", "replay", "save_video", "save_videos", "validated_params"),
    "motiondirector.lora.interop": ("export_kohya", "export_merged", "import_kohya", "import_reference"),
    "motiondirector.lora.package": ("Manifest", "PackageError", "read_package"),
    "motiondirector.lora.targets": ("target_summary",),
    "motiondirector.metrics.clip_scores": ("DEFAULT_PICKSCORE", "DEFAULT_PICKSCORE_PROCESSOR", "ClipScorer"),
    "motiondirector.metrics.evaluate": ("METRICS", "evaluate_videos"),
    "motiondirector.storage": ("atomic_write", "cache_root", "publish", "sha256_file"),
    "motiondirector.train.guard": ("TrainingDiverged",),
    "motiondirector.train.layout": ("RunLayout",),
    "motiondirector.train.loop": ("RunFolderError", "RunSummary", "TrainingInterrupted", "train"),
    "motiondirector.video_io": ("write_gif", "write_grid_png", "write_video"),
}
_SOURCE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted([*_SOURCE, "RegistrationError", "open_catalog", "train_and_register"])


def __getattr__(name: str) -> Any:
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module 'motiondirector.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


class RegistrationError(RuntimeError):
    """Training finished but registering the run in the catalog failed; the run folder is intact."""

    def __init__(self, run_folder: Path, catalog_uri: str, cause: Exception) -> None:
        super().__init__(f"trained {run_folder}, but registering it in catalog {catalog_uri} failed: {cause}; "
                         f"retry with `motiondirector catalog add {run_folder} --catalog {catalog_uri}`")
        self.run_folder, self.catalog_uri = run_folder, catalog_uri


def open_catalog(uri: str | None = None) -> Catalog:
    """The catalog at `uri` (any fsspec URI); None: $MOTIONDIRECTOR_CATALOG or the default root."""
    from motiondirector.catalog import Catalog

    return Catalog(uri)


def train_and_register(config: TrainConfig, out_dir: str | Path, catalog: Catalog | str | None, *,
                       name: str | None = None, tags: Iterable[str] = (), description: str | None = None,
                       lineage: Iterable[str] = (), **train_kwargs: Any) -> tuple[RunSummary, list[Manifest]]:
    """`train(config, out_dir, **train_kwargs)`, then register the run's LoRAs under one run id.

    Returns the run summary and the catalog manifests (temporal first). Only the writing rank
    registers (other ranks of a data-parallel run get an empty list). Raises RegistrationError,
    keeping the trained run, when the catalog write fails.
    """
    from motiondirector.catalog import Catalog, register_run
    from motiondirector.train.layout import RunLayout
    from motiondirector.train.loop import train

    summary = train(config, out_dir, **train_kwargs)
    if catalog is None or not RunLayout(Path(summary.out_dir)).summary.is_file():
        return summary, []
    store = catalog if isinstance(catalog, Catalog) else open_catalog(catalog)
    try:
        manifests = register_run(store, summary.out_dir, name=name, tags=tags, description=description,
                                 lineage=lineage)
    except (OSError, ValueError) as error:
        raise RegistrationError(Path(summary.out_dir), store.uri, error) from error
    return summary, manifests
