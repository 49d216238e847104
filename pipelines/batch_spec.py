"""The batch-training spec: what `motiondirector train-batch SPEC.yaml` trains (docs/training.md).

No Ray here: the spec is read, expanded and validated completely before the driver
(pipelines/train_batch.py) starts or connects to a cluster, so a bad spec exits 2 having started
nothing. Every job's config is validated with the library's config validation; errors name the
spec file, the job and the key.

A job's identity is its *lineage*: the spec file hash, the job name, the resolved training config,
the dataset URI with its committed record fingerprints, and the code version. Its idempotency
key hashes the parts that decide the LoRA weights (name, the config minus the keys that do not
change weights, the dataset's fingerprints, the package version), so re-running a spec -- or an
edited spec whose other jobs changed -- trains nothing already registered, while a changed
dataset or config trains again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from motiondirector.api import describe_validation_error, sha256_file

# Config keys that do not change the weights a run produces (the library's RESUMABLE_CHANGES minus
# `steps`, which does): left out of the idempotency key.
_NOT_IN_KEY = ("device", "log_every", "checkpoint_every", "validation", "cache_dir")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
# A placeholder dataset to validate `defaults` on their own, when the jobs bring the data.
_PLACEHOLDER_DATA = {"dataset": "placeholder#placeholder"}


class SpecError(ValueError):
    """The batch spec is invalid; the message names the file, the job and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Overrides = dict[str, Any] | list[str]


class Resources(_Strict):
    """How many resources a job takes and how many jobs run at once."""

    workers: int = Field(1, ge=1, description="Ray Train workers per job (>1: data parallel).")
    cpus_per_job: float = Field(1.0, gt=0, description="CPUs per worker.")
    gpus_per_job: float = Field(0.0, ge=0, description="GPUs per worker; 0.25 packs four jobs on one GPU.")
    max_concurrent: int | None = Field(None, ge=1, description="Cap on jobs running at once (beyond resources).")
    max_failures: int = Field(2, ge=0, description="Worker failures a job survives (restarts from its checkpoint).")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per worker, e.g. "
                                     "{gpu_node: 1}: the workers run only on nodes that advertise them.")


class Preview(_Strict):
    """The preview gif each job samples at its last step (registered with its LoRAs)."""

    enabled: bool = True
    prompt: str | None = Field(None, description="Default: the job's first validation prompt, else the library's "
                                                 "default (one sample per distinct training caption).")


class FaultInjection(_Strict):
    """Test hook (documented in docs/training.md): the rank-0 worker SIGKILLs itself once, after step
    `kill_at_step`, on the first attempt that gets there. Not part of the job's identity."""

    kill_at_step: int = Field(ge=1)


class JobSpec(_Strict):
    name: str
    dataset: str | None = Field(None, description="'<ingest output URI>#<dataset name>'; default: defaults.data.")
    overrides: Overrides = Field(default_factory=dict, description="Config keys for this job: {key: value} or "
                                                                   "['key=value', ...] (dotted keys).")
    resources: Resources | None = None
    fault_injection: FaultInjection | None = None

    @field_validator("name")
    @classmethod
    def _is_a_folder_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"job name {name!r}: use letters, digits and . _ = - (it names a folder)")
        return name


class FromIngest(_Strict):
    """One job per committed dataset of an ingest output (optionally filtered by fnmatch patterns)."""

    uri: str
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    prefix: str = Field("", description="Prepended to the dataset name to form the job name.")
    overrides: Overrides = Field(default_factory=dict)


class BatchSpecFile(_Strict):
    storage: str | None = Field(None, description="Checkpoints, run state and reports; --storage overrides.")
    catalog: str | None = Field(None, description="Where finished LoRAs are registered; --catalog overrides.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="A training config shared by all jobs.")
    resources: Resources = Field(default_factory=Resources)
    preview: Preview = Field(default_factory=Preview)
    jobs: list[JobSpec] = Field(default_factory=list)
    from_ingest: list[FromIngest] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Cross product over config keys.")

    @field_validator("from_ingest", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict | str) else value

    @field_validator("from_ingest", mode="before")
    @classmethod
    def _uri_shorthand(cls, value: Any) -> Any:
        return [{"uri": item} if isinstance(item, str) else item for item in value] if isinstance(value, list) \
            else value

    @model_validator(mode="after")
    def _has_jobs(self) -> BatchSpecFile:
        if not self.jobs and not self.from_ingest:
            raise ValueError("the spec has no `jobs` and no `from_ingest`: nothing to train")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: an empty list of values")
        return self


@dataclass
class Job:
    """One training job, fully resolved."""

    name: str
    job_id: str  # <name>-<key prefix>: the Ray Train run name and storage folder
    key: str  # idempotency key (sha256 hex)
    config: dict[str, Any]  # the validated training config, JSON form
    dataset: str  # '<uri>#<name>'
    resources: Resources
    lineage: dict[str, Any]
    preview: bool
    preview_prompt: str | None
    fault_injection: FaultInjection | None = None

    def payload(self) -> dict[str, Any]:
        """What travels to the Ray workers (plain data)."""
        return {"name": self.name, "job_id": self.job_id, "key": self.key, "config": self.config,
                "dataset": self.dataset, "lineage": self.lineage, "preview": self.preview,
                "preview_prompt": self.preview_prompt,
                "kill_at_step": self.fault_injection.kill_at_step if self.fault_injection else None}


@dataclass
class BatchSpec:
    path: Path
    sha256: str
    storage: str | None
    catalog: str | None
    resources: Resources
    jobs: list[Job] = field(default_factory=list)


# --- helpers ----------------------------------------------------------------------------------------

@cache
def code_version() -> dict[str, str]:
    """The package version (part of the key) and, in a git checkout, the commit (lineage only)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("motiondirector")
    except PackageNotFoundError:
        package = "unknown"
    info = {"package": package}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def _resolve_uri(uri: str, folder: Path) -> str:
    """Relative local paths in the spec are relative to the spec file's folder (as in ingest specs)."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((folder / uri).resolve())


def _resolve_reference(reference: str, folder: Path) -> str:
    uri, hash_sign, name = reference.rpartition("#")
    return f"{_resolve_uri(uri, folder)}#{name}" if hash_sign and uri else reference


def _override_strings(overrides: Overrides) -> list[str]:
    """{key: value} -> ['key=value'] in the library's --set syntax (values as YAML)."""
    if isinstance(overrides, list):
        return list(overrides)
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in overrides.items()]


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _grid_suffix(point: dict[str, Any]) -> str:
    parts = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "--".join(parts))


def _committed_datasets(uri: str, source: str) -> dict[str, Any]:
    """name -> DatasetState of the ingest output's committed datasets (the library's reader)."""
    from motiondirector.api import IngestStore

    try:
        return IngestStore(uri).state().datasets
    except (OSError, ValueError) as error:
        raise SpecError(f"{source}: cannot read the ingest output {uri} ({error})") from None


# --- loading ----------------------------------------------------------------------------------------

def read_spec_file(path: Path) -> BatchSpecFile:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read the spec ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with `defaults` and `jobs`, got {type(data).__name__}")
    try:
        return BatchSpecFile.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{path}: {describe_validation_error(error, BatchSpecFile)}") from None


def _job_config(defaults: dict[str, Any], overrides: Sequence[str], dataset: str | None,
                source: str) -> dict[str, Any]:
    """defaults + overrides (+ dataset) validated by the library; returns the config's JSON form."""
    from motiondirector.api import ConfigError, apply_overrides, validate_config

    try:
        data = apply_overrides(defaults, overrides)
        if dataset is not None:
            previous = data.get("data") if isinstance(data.get("data"), dict) else {}
            concept = previous.get("concept") if "dataset" in previous else None
            data["data"] = {"dataset": dataset, **({"concept": concept} if concept else {})}
        return validate_config(data, source).model_dump(mode="json")
    except ConfigError as error:
        raise SpecError(str(error)) from None


def _key_and_lineage(name: str, config: dict[str, Any], dataset: str, clips: list[dict[str, Any]],
                     spec_sha256: str, spec_path: Path) -> tuple[str, dict[str, Any]]:
    fingerprints = [[c["latent_fingerprint"], c["text_fingerprint"]] for c in clips]
    version = code_version()
    identity = {"name": name, "config": {k: v for k, v in config.items() if k not in _NOT_IN_KEY},
                "dataset": dataset, "records": fingerprints, "code": version["package"]}
    key = hashlib.sha256(_canonical(identity)).hexdigest()
    lineage = {"spec": str(spec_path), "spec_sha256": spec_sha256, "job": name, "config": config,
               "dataset": dataset, "record_fingerprints": fingerprints, "code_version": version, "key": key}
    return key, lineage


def load_batch_spec(path: str | Path, *, storage: str | None = None, catalog: str | None = None) -> BatchSpec:
    """Read, expand (from_ingest x grid) and validate every job of a spec; raises SpecError."""
    path = Path(path)
    spec = read_spec_file(path)
    folder = path.resolve().parent
    spec_sha256 = sha256_file(path)
    defaults = dict(spec.defaults)
    if isinstance(defaults.get("data"), dict) and isinstance(defaults["data"].get("dataset"), str):
        defaults["data"] = {**defaults["data"], "dataset": _resolve_reference(defaults["data"]["dataset"], folder)}
    # The defaults alone: their own errors are named once, as `defaults`.
    _job_config(defaults if "data" in defaults else {**defaults, "data": _PLACEHOLDER_DATA}, [], None,
                f"{path}: defaults")

    # (name, dataset reference or None, overrides, resources, fault injection)
    wanted: list[tuple[str, str | None, list[str], Resources | None, FaultInjection | None]] = []
    for job in spec.jobs:
        dataset = _resolve_reference(job.dataset, folder) if job.dataset else None
        wanted.append((job.name, dataset, _override_strings(job.overrides), job.resources, job.fault_injection))
    for index, source in enumerate(spec.from_ingest):
        uri = _resolve_uri(source.uri, folder)
        names = sorted(_committed_datasets(uri, f"{path}: from_ingest[{index}]"))
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in source.include)
                  and not any(fnmatch.fnmatchcase(n, p) for p in source.exclude)]
        if not chosen:
            raise SpecError(f"{path}: from_ingest[{index}]: no committed dataset of {uri} matches include "
                            f"{source.include} / exclude {source.exclude} (committed: {', '.join(names) or 'none'})")
        wanted += [(f"{source.prefix}{name}", f"{uri}#{name}", _override_strings(source.overrides), None, None)
                   for name in chosen]

    jobs: list[Job] = []
    states: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for base_name, dataset, overrides, resources, fault in wanted:
        for point in _grid_points(spec.grid):
            name = f"{base_name}--{_grid_suffix(point)}" if point else base_name
            if name in seen:
                raise SpecError(f"{path}: job {name!r} appears twice (job names must be unique)")
            seen[name] = name
            grid_overrides = _override_strings(point)
            source = f"{path}: job {name!r}"
            config = _job_config(defaults, [*overrides, *grid_overrides], dataset, source)
            reference = config["data"].get("dataset") if isinstance(config.get("data"), dict) else None
            if reference is None:
                raise SpecError(f"{source}: dataset: required key is missing (batch jobs train on ingested "
                                "datasets: '<ingest output URI>#<name>')")
            uri, _, dataset_name = reference.rpartition("#")
            if uri not in states:
                states[uri] = _committed_datasets(uri, source)
            if dataset_name not in states[uri]:
                known = ", ".join(sorted(states[uri])) or "none"
                raise SpecError(f"{source}: dataset: {uri} has no committed dataset {dataset_name!r} "
                                f"(committed: {known})")
            state = states[uri][dataset_name]
            clips = [clip.model_dump(mode="json") for clip in state.clips]
            if not clips:
                raise SpecError(f"{source}: dataset: {reference} has no clips (its last ingest rejected every file)")
            key, lineage = _key_and_lineage(name, config, reference, clips, spec_sha256, path)
            resources_used = resources or spec.resources
            prompt = (spec.preview.prompt or (config["validation"]["prompts"] or [None])[0]) \
                if spec.preview.enabled else None
            jobs.append(Job(name=name, job_id=f"{name}-{key[:10]}", key=key, config=config, dataset=reference,
                            resources=resources_used, lineage=lineage, preview=spec.preview.enabled,
                            preview_prompt=prompt, fault_injection=fault))
    return BatchSpec(path=path, sha256=spec_sha256,
                     storage=storage or (_resolve_uri(spec.storage, folder) if spec.storage else None),
                     catalog=catalog or (_resolve_uri(spec.catalog, folder) if spec.catalog else None),
                     resources=spec.resources, jobs=jobs)
