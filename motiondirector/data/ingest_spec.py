"""The ingest spec: what `motiondirector ingest SPEC.yaml` ingests, with which model, into which output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from motiondirector.data.reference import DATASET_NAME
from motiondirector.data.sources import DatasetSpec
from motiondirector.errors import describe_validation_error
from motiondirector.storage import normalize


class IngestDataset(DatasetSpec):
    """A DatasetSpec plus the base model whose VAE and text encoder encode it (default: the spec's `base`)."""

    base: str | None = Field(None, description="Base model for this dataset; default: the spec's `base`.")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        if not DATASET_NAME.match(name):
            raise ValueError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' "
                             "(it becomes a folder name and the #name of references)")
        return name


class IngestSpec(BaseModel):
    """What `motiondirector ingest SPEC.yaml` ingests, with which model, into which output."""

    model_config = ConfigDict(extra="forbid")

    output: str | None = Field(None, description="Output URI (local path or fsspec URL); --output overrides it.")
    base: str | None = Field(None, description="Default base model for datasets that set none.")
    device: str = Field("auto", description="Encoder device inside each actor: auto | cpu | cuda.")
    encoders: int = Field(1, ge=1, description="Encoder actors (one model copy each; one GPU each when present).")
    batch_size: int = Field(4, ge=1, description="Clips per encoder call.")
    encoder_memory_gib: float | None = Field(None, gt=0, description="Memory Ray reserves per encoder actor.")
    encoder_cpus: float | None = Field(None, ge=0, description="CPUs Ray reserves per encoder actor (default 1; keep "
                                       "the total below the cluster's CPUs, or no decode task fits beside them).")
    encoder_threads: int | None = Field(None, ge=1, description="torch threads inside each encoder actor "
                                        "(default: Ray's, i.e. the reserved CPUs rounded down, at least 1).")
    decode_cpus: float | None = Field(None, gt=0, description="CPUs Ray reserves per decode task (default 1).")
    files_per_decode_task: int = Field(1, ge=1, description="Source files decoded by one decode task.")
    datasets: list[IngestDataset] = Field(min_length=1)

    # Custom Ray resources (node labels set with `ray start --resources`) that pin a stage to the nodes
    # advertising them, e.g. {"decode_node": 1} for the plan and decode tasks and {"gpu_node": 1} for the
    # encoder actors. Empty: Ray places the stage on any node with the CPUs/GPUs it asks for.
    decode_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per plan "
                                               "and decode task (pins them to nodes that advertise them).")
    encoder_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per "
                                                "encoder actor (pins the encoders to nodes that advertise them).")

    @model_validator(mode="after")
    def _check(self) -> IngestSpec:
        names = [d.name for d in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset names must be unique, repeated: {', '.join(duplicates)}")
        unencoded = [d.name for d in self.datasets if not (d.base or self.base)]
        if unencoded:
            raise ValueError(f"no base model for {', '.join(unencoded)}: set `base` at the top or per dataset")
        return self

    def base_of(self, dataset: IngestDataset) -> str:
        return str(dataset.base or self.base)

    def with_model_defaults(self) -> IngestSpec:
        """Each dataset's unset frames / fps / size taken from the base model that encodes it."""
        from motiondirector.backbones import defaults_for

        return self.model_copy(update={"datasets": [
            dataset.with_model_defaults(defaults_for(self.base_of(dataset))) for dataset in self.datasets]})


def load_ingest_spec(path: str | Path, *, base: str | None = None, output: str | None = None) -> IngestSpec:
    """Read SPEC.yaml. Relative source paths and `output` are resolved against the spec file's folder.

    `base` replaces the default base model, `output` the spec's output (both as given, e.g. from the CLI).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such ingest spec") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with `datasets:` (and `output`, `base`, ...)")
    folder = path.resolve().parent
    datasets = raw.get("datasets")
    if isinstance(datasets, list):
        raw["datasets"] = [_with_resolved_sources(d, folder) for d in datasets]
    if isinstance(raw.get("output"), str):
        raw["output"] = normalize(raw["output"], relative_to=folder)
    if base is not None:
        raw["base"] = base
    if output is not None:
        raw["output"] = output
    try:
        return IngestSpec.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{path}: {describe_validation_error(error, IngestSpec)}") from None


def _with_resolved_sources(dataset: Any, folder: Path) -> Any:
    if not isinstance(dataset, dict) or "sources" not in dataset:
        return dataset
    sources = dataset["sources"]
    listed = [sources] if isinstance(sources, str) else sources
    if not isinstance(listed, list):
        return dataset
    return {**dataset, "sources": [normalize(s, relative_to=folder) if isinstance(s, str) else s for s in listed]}
