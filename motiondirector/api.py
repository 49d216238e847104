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

Importing this module loads torch and diffusers; callers that must start fast import it lazily.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from motiondirector.animate import animate, image_appearance
from motiondirector.backbones import (
    BackboneSpec,
    ModelDefaults,
    ModelNotAvailableError,
    ModelTooLargeError,
    defaults_for,
    load_backbone,
    resolve_device,
)
from motiondirector.catalog import (
    Catalog,
    CatalogOnDemand,
    CorruptEntryError,
    InvalidIdError,
    UnknownEntryError,
    register_run,
    validate_id,
)
from motiondirector.config import ConfigError, TrainConfig, apply_overrides, load_config, validate_config
from motiondirector.events import (
    CheckpointWritten,
    Event,
    Observer,
    Progress,
    Recorder,
    TrainFinished,
    TrainStarted,
    TrainStep,
    ValidationSample,
)
from motiondirector.generate import (
    GeneratedVideo,
    GenerationParams,
    HeldComposition,
    LoraChoice,
    generate_batch,
    package_base,
    read_sidecar,
    replay,
    save_video,
    save_videos,
    validated_params,
)
from motiondirector.generate import generate as generate
from motiondirector.lora.package import Manifest, PackageError
from motiondirector.train.guard import TrainingDiverged
from motiondirector.train.layout import RunLayout
from motiondirector.train.loop import RunFolderError, RunSummary, TrainingInterrupted, train

__all__ = [
    "BackboneSpec", "Catalog", "CatalogOnDemand", "CheckpointWritten", "ConfigError", "CorruptEntryError", "Event",
    "GeneratedVideo", "GenerationParams", "HeldComposition", "InvalidIdError", "LoraChoice", "Manifest", "ModelDefaults",
    "ModelNotAvailableError", "ModelTooLargeError", "Observer", "PackageError", "Progress", "Recorder",
    "RegistrationError", "RunFolderError", "RunSummary", "TrainConfig", "TrainFinished", "TrainStarted",
    "TrainStep", "TrainingDiverged", "TrainingInterrupted", "UnknownEntryError", "ValidationSample", "animate",
    "apply_overrides", "defaults_for", "generate", "generate_batch", "image_appearance", "load_backbone", "load_config",
    "open_catalog",
    "package_base", "read_sidecar", "register_run", "replay", "resolve_device", "save_video", "save_videos",
    "train", "train_and_register", "validate_config", "validate_id", "validated_params",
]


class RegistrationError(RuntimeError):
    """Training finished but registering the run in the catalog failed; the run folder is intact."""

    def __init__(self, run_folder: Path, catalog_uri: str, cause: Exception) -> None:
        super().__init__(f"trained {run_folder}, but registering it in catalog {catalog_uri} failed: {cause}; "
                         f"retry with `motiondirector catalog add {run_folder} --catalog {catalog_uri}`")
        self.run_folder, self.catalog_uri = run_folder, catalog_uri


def open_catalog(uri: str | None = None) -> Catalog:
    """The catalog at `uri` (any fsspec URI); None: $MOTIONDIRECTOR_CATALOG or the default root."""
    return Catalog(uri)


def train_and_register(config: TrainConfig, out_dir: str | Path, catalog: Catalog | str | None, *,
                       name: str | None = None, tags: Iterable[str] = (), description: str | None = None,
                       lineage: Iterable[str] = (), **train_kwargs: Any) -> tuple[RunSummary, list[Manifest]]:
    """`train(config, out_dir, **train_kwargs)`, then register the run's LoRAs under one run id.

    Returns the run summary and the catalog manifests (temporal first). Only the writing rank
    registers (other ranks of a data-parallel run get an empty list). Raises RegistrationError,
    keeping the trained run, when the catalog write fails.
    """
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
