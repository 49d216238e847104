"""The LoRA package: the one on-disk format of a trained adapter, for the whole system.

A package is a folder holding ONE adapter of one kind (spatial or temporal):

    adapter_config.json          peft LoraConfig (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    PEFT-layout weights: <module>.lora_A.weight / <module>.lora_B.weight
    manifest.json                `Manifest` below — written last: its presence marks the package complete

Training run folders, checkpoints and catalog entries all hold packages. Only safetensors are read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from motiondirector.errors import describe_validation_error
from motiondirector.lora.settings import LoraSettings, state_dict_modules
from motiondirector.storage import atomic_output, atomic_write

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PACKAGE_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

LoraKind = Literal["spatial", "temporal"]


class PackageError(ValueError):
    """A package is missing, malformed or incompatible; the message names the file and the problem."""


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    architecture: str  # BackboneSpec.architecture_fingerprint


class Manifest(BaseModel):
    """Everything known about one adapter. Training fills the first block, the catalog the second."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: LoraKind
    base: BaseModelRef
    rank: int
    alpha: float
    targets: list[str]
    mode: str = "dual_path"
    training_config: dict[str, Any] = Field(default_factory=dict)
    data_fingerprints: list[str] = Field(default_factory=list)
    captions: list[str] = Field(default_factory=list)
    concept: str | None = None
    step: int = 0
    losses: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    # Filled by the catalog when the package is registered.
    id: str | None = None
    name: str | None = None
    sha256: dict[str, str] = Field(default_factory=dict)
    preview: str | None = None
    run_id: str | None = None
    lineage: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    description: str | None = None

    @property
    def settings(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=0.0)


def write_package(folder: str | Path, state: dict[str, torch.Tensor], manifest: Manifest) -> Path:
    """Write a complete package; the manifest goes last so a crash leaves no 'complete' package."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    modules = state_dict_modules(state)
    if sorted(modules) != sorted(manifest.targets):
        raise PackageError(f"{folder}: weights cover {len(modules)} modules but the manifest lists "
                           f"{len(manifest.targets)} targets")
    config = manifest.settings.peft_config(manifest.targets).to_dict()
    config["lora_dropout"] = manifest.training_config.get("lora_dropout", 0.0)
    atomic_write(folder / ADAPTER_CONFIG, json.dumps(_jsonable(config), indent=2).encode())
    with atomic_output(folder / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt"})  # one key: byte-identical files for equal weights
    atomic_write(folder / MANIFEST, manifest.model_dump_json(indent=2).encode())
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value"):  # enums
        return value.value
    return value


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise PackageError(f"{path.parent}: not a LoRA package (no {MANIFEST}; an incomplete write leaves none)")
    return parse_manifest(path.read_bytes(), source=str(path))


def parse_manifest(data: bytes | str, source: str = MANIFEST) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as error:
        problems = describe_validation_error(error, Manifest, limit=5)
        raise PackageError(f"{source}: invalid manifest ({problems})") from error


def read_package(folder: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Manifest + weights of a complete package, checked against each other."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise PackageError(f"{weights}: missing (only safetensors weights are loaded)")
    state = load_file(str(weights))
    modules = state_dict_modules(state)
    if sorted(modules) != sorted(manifest.targets):
        raise PackageError(f"{weights}: weights cover {len(modules)} modules, manifest lists "
                           f"{len(manifest.targets)} targets")
    for key, tensor in state.items():
        dim = 0 if ".lora_A." in key else 1
        if tensor.shape[dim] != manifest.rank:
            raise PackageError(f"{weights}: {key} has rank {tensor.shape[dim]}, manifest says {manifest.rank}")
    return manifest, state


def check_compatible(manifest: Manifest, architecture: str, module_shapes: dict[str, tuple[int, int]],
                     source: str, expected_kind: LoraKind | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> None:
    """Raise PackageError saying what differs between a package and the model it is loaded into.

    `module_shapes` maps Linear names of the model to (out_features, in_features); with `state`
    (the package weights) every LoRA's shape is checked against its Linear too.
    """
    if expected_kind is not None and manifest.kind != expected_kind:
        raise PackageError(f"{source}: is a {manifest.kind} LoRA, but a {expected_kind} LoRA is needed here "
                           f"({'motion = temporal' if expected_kind == 'temporal' else 'appearance = spatial'})")
    if manifest.base.architecture != architecture:
        raise PackageError(f"{source}: trained for base {manifest.base.model_id!r} (architecture "
                           f"{manifest.base.architecture}), but the loaded base has architecture {architecture}")
    missing = [name for name in manifest.targets if name not in module_shapes]
    if missing:
        raise PackageError(f"{source}: {len(missing)} target modules are missing from the base model, "
                           f"e.g. {missing[0]}")
    for name in manifest.targets if state is not None else []:
        out_features, in_features = module_shapes[name]
        down, up = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        if down.shape[1] != in_features or up.shape[0] != out_features:
            raise PackageError(f"{source}: the LoRA on {name} maps {down.shape[1]} -> {up.shape[0]} features, "
                               f"the base's Linear maps {in_features} -> {out_features}")
