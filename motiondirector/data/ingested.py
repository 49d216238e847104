"""Ingestion output on any fsspec filesystem: the ingest spec, commit manifests, skip logic and the reader.

No Ray here: the Ray driver (pipelines/ingest.py) calls these pure functions, and training reads a
dataset with `read_ingested(uri, name)` using pyarrow + fsspec alone.

Layout under the output URI::

    commits/<committed-at>-<run_id>.json     commit manifests: the ONLY thing readers trust
    runs/<run_id>.tmp/                         a run in progress (or one that crashed): never read
    runs/<run_id>/records/<dataset>/part-*.parquet   cache records (RECORD_SCHEMA), partitioned by dataset
    runs/<run_id>/rejects/part-*.parquet       files that could not be used (REJECT_SCHEMA)

A run writes into its `.tmp` folder, renames it, then writes its manifest last (temp + rename locally,
one PUT on object stores). Each manifest lists its data files and, per dataset it ingested, the clips
the dataset has now ("live" clips: fingerprints + where they sit in the dataset). A dataset's current
state is the live list of the latest commit that mentions it; rows in older files that are not live
are superseded and stay until `prune`, which writes one compacted commit replacing all earlier ones.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from motiondirector.data.encode import (
    ClipPlan,
    DecodedClip,
    decode_plans,
    encode_latents,
    encode_texts,
    make_record,
    plan_item,
)
from motiondirector.data.errors import DataError
from motiondirector.data.records import CacheRecord, records_to_table, table_to_records
from motiondirector.data.sources import DatasetSpec, SourceItem

COMMITS = "commits"
RUNS = "runs"
TEMP_SUFFIX = ".tmp"
COMMIT_KIND = "motiondirector-ingest-commit"
SCHEMA_VERSION = 1
# Dataset names become folder names and the `#name` part of references.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

REJECT_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # list (a source) | plan (header, hash) | decode (frames)
    pa.field("reason", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),  # "<ExceptionType>: <message>"
])


# --- the ingest spec --------------------------------------------------------------------------------
class IngestDataset(DatasetSpec):
    """A DatasetSpec plus the base model whose VAE and text encoder encode it (default: the spec's `base`)."""

    base: str | None = Field(None, description="Base model for this dataset; default: the spec's `base`.")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        if not _DATASET_NAME.match(name):
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


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve_relative(path: str, folder: Path) -> str:
    return path if _is_url(path) or os.path.isabs(path) else os.path.normpath(folder / path)


def _validation_message(source: str, error: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<top>'}: {e['msg']}" for e in error.errors())
    return f"{source}: {problems}"


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
        raw["output"] = _resolve_relative(raw["output"], folder)
    if base is not None:
        raw["base"] = base
    if output is not None:
        raw["output"] = output
    try:
        return IngestSpec.model_validate(raw)
    except ValidationError as error:
        raise ValueError(_validation_message(str(path), error)) from None


def _with_resolved_sources(dataset: Any, folder: Path) -> Any:
    if not isinstance(dataset, dict) or "sources" not in dataset:
        return dataset
    sources = dataset["sources"]
    listed = [sources] if isinstance(sources, str) else sources
    if not isinstance(listed, list):
        return dataset
    return {**dataset, "sources": [_resolve_relative(s, folder) if isinstance(s, str) else s for s in listed]}


# --- commit manifests -------------------------------------------------------------------------------
class LiveClip(BaseModel):
    """One clip a dataset has now: which committed row holds it and where it sits in the dataset.

    Position fields live here, not only in the row, because they change without the fingerprints
    changing (a file added before it shifts video_index; a renamed file keeps its content hash).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_path: str
    video_index: int
    clip_index: int
    latent_fingerprint: str
    text_fingerprint: str
    extra: dict[str, Any] = {}

    @property
    def key(self) -> tuple[str, str]:
        return self.latent_fingerprint, self.text_fingerprint

    @classmethod
    def of(cls, plan: ClipPlan | CacheRecord, latent_fingerprint: str, text_fingerprint: str) -> LiveClip:
        return cls(video_path=plan.video_path, video_index=plan.video_index, clip_index=plan.clip_index,
                   latent_fingerprint=latent_fingerprint, text_fingerprint=text_fingerprint, extra=plan.extra)


class DatasetState(BaseModel):
    """A dataset as of one commit: its spec, encoder identities and live clips."""

    model_config = ConfigDict(extra="forbid")

    base: str
    vae_id: str
    text_encoder_id: str
    concept: str | None = None
    spec: dict[str, Any]
    clips: list[LiveClip]

    def same_content(self, other: DatasetState) -> bool:
        return (self.vae_id, self.text_encoder_id, self.concept, sorted(self.clips, key=_clip_order)) == \
            (other.vae_id, other.text_encoder_id, other.concept, sorted(other.clips, key=_clip_order))


def _clip_order(clip: LiveClip) -> tuple:
    return clip.video_index, clip.clip_index, clip.video_path, clip.key


class DataFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the output root
    rows: int
    dataset: str | None = None  # None for rejects files (they hold several datasets)


class CommitManifest(BaseModel):
    """Written last by a run: lists its files; readers and the skip logic trust nothing else."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: Literal["motiondirector-ingest-commit"] = COMMIT_KIND
    run_id: str
    committed_at: datetime
    records: list[DataFile] = []
    rejects: list[DataFile] = []
    datasets: dict[str, DatasetState] = {}
    supersedes: list[str] = Field([], description="Commit file names this (compacted) commit replaces.")
    summary: dict[str, dict[str, int]] = {}

    @field_validator("schema_version")
    @classmethod
    def _readable(cls, version: int) -> int:
        if version > SCHEMA_VERSION:
            raise ValueError(f"commit schema_version {version} is newer than this reader's ({SCHEMA_VERSION}): "
                             "upgrade motiondirector")
        return version


@dataclasses.dataclass(frozen=True)
class Reject:
    """A file that could not be used, and why."""

    dataset: str
    path: str
    stage: str
    reason: str
    error: str

    @classmethod
    def of(cls, error: BaseException, dataset: str, path: str, stage: str) -> Reject:
        reason = error.reason if isinstance(error, DataError) else f"unexpected error ({type(error).__name__})"
        return cls(dataset=dataset, path=getattr(error, "path", path) or path, stage=stage, reason=reason,
                   error=f"{type(error).__name__}: {error}")


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


class IngestStore:
    """An ingest output root on any fsspec filesystem."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def run_folder(self, run_id: str, temporary: bool = False) -> str:
        """Relative folder of a run's data."""
        return posixpath.join(RUNS, run_id + (TEMP_SUFFIX if temporary else ""))

    # commits ------------------------------------------------------------------------------------
    def commit_names(self) -> list[str]:
        folder = self.path(COMMITS)
        if not self.fs.isdir(folder):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(folder, detail=False)]
        # dot-files are atomic-write temporaries: not committed
        return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))

    def commits(self) -> list[tuple[str, CommitManifest]]:
        """Committed manifests in commit order, minus those a compacted commit superseded."""
        manifests = []
        for name in self.commit_names():
            location = self.path(posixpath.join(COMMITS, name))
            try:
                manifests.append((name, CommitManifest.model_validate_json(self.fs.cat_file(location))))
            except ValidationError as error:
                raise ValueError(_validation_message(location, error)) from None
        superseded = {old for _, manifest in manifests for old in manifest.supersedes}
        return [(name, manifest) for name, manifest in manifests if name not in superseded]

    def write_commit(self, manifest: CommitManifest) -> str:
        """Publish a manifest: the commit point of a run. Returns its file name."""
        name = f"{manifest.committed_at:%Y%m%dT%H%M%S%f}-{manifest.run_id}.json"
        _publish(self.fs, self.path(posixpath.join(COMMITS, name)), manifest.model_dump_json(indent=2).encode())
        return name

    def state(self) -> CommittedState:
        return CommittedState.of(self, self.commits())

    # runs -----------------------------------------------------------------------------------------
    def publish_run(self, run_id: str) -> None:
        """Rename runs/<id>.tmp to runs/<id> (a copy on object stores); still invisible until committed."""
        temp = self.path(self.run_folder(run_id, temporary=True))
        if self.fs.exists(temp):  # a run that only changed live lists wrote no files
            self.fs.mv(temp, self.path(self.run_folder(run_id)), recursive=True)

    def discard_run(self, run_id: str) -> None:
        temp = self.path(self.run_folder(run_id, temporary=True))
        if self.fs.exists(temp):
            self.fs.rm(temp, recursive=True)

    def commit_run(self, run_id: str, records: Sequence[DataFile], rejects: Sequence[Reject],
                   datasets: dict[str, DatasetState], summary: dict[str, dict[str, int]] | None = None) -> str | None:
        """Commit a run whose record files sit in its temporary folder: write its rejects table, rename the
        folder, write the manifest last. Datasets whose content equals the committed state are left out;
        when nothing changed, the temporary folder is discarded and no commit is written (returns None).
        """
        current = self.state().datasets
        changed = {name: state for name, state in datasets.items()
                   if name not in current or not current[name].same_content(state)}
        if not records and not changed:
            self.discard_run(run_id)
            return None
        temp, folder = self.run_folder(run_id, temporary=True), self.run_folder(run_id)
        reject_files = [write_rejects(self, temp, rejects)] if rejects else []
        self.publish_run(run_id)
        return self.write_commit(CommitManifest(
            run_id=run_id, committed_at=datetime.now(UTC), records=_relocate(records, temp, folder),
            rejects=_relocate(reject_files, temp, folder), datasets=changed, summary=summary or {}))


def _publish(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` appear complete or not at all: temp + rename locally, one PUT on object stores."""
    from fsspec.implementations.local import LocalFileSystem

    from motiondirector.lora.package import atomic_write_bytes

    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), data)
    else:
        fs.pipe_file(path, data)


@dataclasses.dataclass
class CommittedState:
    """What the committed manifests say: each dataset's latest state and every committed file."""

    store: IngestStore
    datasets: dict[str, DatasetState]
    record_files: dict[str, list[str]]  # dataset -> relative paths, commit order
    commit_names: list[str]
    run_folders: set[str]  # relative folders of committed runs

    @classmethod
    def of(cls, store: IngestStore, commits: Sequence[tuple[str, CommitManifest]]) -> CommittedState:
        datasets: dict[str, DatasetState] = {}
        files: dict[str, list[str]] = {}
        folders: set[str] = set()
        for _, manifest in commits:
            datasets.update(manifest.datasets)
            folders.add(posixpath.join(RUNS, manifest.run_id))
            for data_file in manifest.records:
                files.setdefault(str(data_file.dataset), []).append(data_file.path)
        return cls(store, datasets, files, [name for name, _ in commits], folders)

    def dataset(self, name: str) -> DatasetState:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ValueError(f"{self.store.uri}: no committed dataset {name!r} (committed: {known})")
        return self.datasets[name]

    def index(self) -> RowIndex:
        """Which rows are committed, read from the fingerprint columns of every committed file."""
        index = RowIndex()
        for files in self.record_files.values():
            for relative in files:
                location = self.store.path(relative)
                table = pq.read_table(location, filesystem=self.store.fs,
                                      columns=["dataset", "latent_fingerprint", "text_fingerprint"])
                index.add(location, table.column("dataset").to_pylist(),
                          table.column("latent_fingerprint").to_pylist(), table.column("text_fingerprint").to_pylist())
        return index


# --- skip logic -------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClipWork:
    """What a run does with one planned clip.

    keep: the dataset already has a committed row with both fingerprints: nothing to do.
    build: a new row; its latents come from `latent_source` (a committed file holding the same
    latent fingerprint, so no pixels and no VAE) or from the VAE on decoded pixels, and its text
    embedding from `text_source` or the text encoder.
    """

    plan: ClipPlan  # a DecodedClip when the VAE has to run
    latent_fingerprint: str
    text_fingerprint: str
    action: Literal["keep", "build"]
    latent_source: str | None = None
    text_source: str | None = None

    @property
    def needs_pixels(self) -> bool:
        return self.action == "build" and self.latent_source is None

    @property
    def live(self) -> LiveClip:
        return LiveClip.of(self.plan, self.latent_fingerprint, self.text_fingerprint)


@dataclasses.dataclass
class RowIndex:
    """Committed rows by fingerprint. Latents and text embeddings are reusable across datasets."""

    rows: set[tuple[str, str, str]] = dataclasses.field(default_factory=set)  # (dataset, latent fp, text fp)
    latent_files: dict[str, str] = dataclasses.field(default_factory=dict)  # latent fp -> file holding it
    text_files: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, location: str, datasets: Iterable[str], latents: Iterable[str], texts: Iterable[str]) -> None:
        for dataset, latent, text in zip(datasets, latents, texts, strict=True):
            self.rows.add((dataset, latent, text))
            self.latent_files.setdefault(latent, location)
            self.text_files.setdefault(text, location)

    def only(self, datasets: Iterable[str]) -> RowIndex:
        """The part a run over `datasets` needs to ship to its workers (reusable arrays stay global)."""
        wanted = set(datasets)
        return RowIndex({row for row in self.rows if row[0] in wanted}, self.latent_files, self.text_files)

    def decide(self, plan: ClipPlan, vae_id: str, text_encoder_id: str) -> ClipWork:
        latent, text = plan.latent_fingerprint(vae_id), plan.text_fingerprint(text_encoder_id)
        if (plan.dataset, latent, text) in self.rows:
            return ClipWork(plan, latent, text, "keep")
        return ClipWork(plan, latent, text, "build", self.latent_files.get(latent), self.text_files.get(text))


def plan_works(item: SourceItem, spec: DatasetSpec, index: RowIndex, vae_id: str,
               text_encoder_id: str) -> list[ClipWork]:
    """First CPU stage of ingestion: the file's clips (header and hash only, no pixels), each decided.

    Raises DataError (or whatever the decoder raises) for a bad file.
    """
    return [index.decide(plan, vae_id, text_encoder_id) for plan in plan_item(item, spec)]


def decode_works(works: Sequence[ClipWork]) -> list[ClipWork]:
    """Second CPU stage: decode the pixels of the works that need the VAE (each file once)."""
    decoded = {_clip_key(clip): clip for clip in decode_plans([work.plan for work in works if work.needs_pixels])}
    return [dataclasses.replace(work, plan=decoded[_clip_key(work.plan)]) if work.needs_pixels else work
            for work in works]


def _clip_key(plan: ClipPlan) -> tuple[str, str, int]:
    return plan.dataset, plan.video_path, plan.clip_index


def _load_rows(fs: fsspec.AbstractFileSystem, column: str, wanted: dict[str, str]) -> dict[str, CacheRecord]:
    """Committed rows holding each wanted fingerprint (fingerprint -> file), read once per file."""
    by_file: dict[str, set[str]] = {}
    for fingerprint_value, location in wanted.items():
        by_file.setdefault(location, set()).add(fingerprint_value)
    found: dict[str, CacheRecord] = {}
    for location, values in by_file.items():
        table = pq.read_table(location, filesystem=fs, filters=[(column, "in", sorted(values))])
        for record in table_to_records(table):
            found.setdefault(getattr(record, column), record)
    missing = set(wanted) - set(found)
    if missing:
        raise ValueError(f"committed files lost rows with {column} {sorted(missing)[:3]} (was the output edited?)")
    return found


def build_records(backbone, works: Sequence[ClipWork], fs: fsspec.AbstractFileSystem,
                  batch_size: int = 1) -> list[CacheRecord]:
    """Model stage of ingestion: a record for each `build` work, encoding only what is not committed."""
    builds = [work for work in works if work.action == "build"]
    reused_latents = _load_rows(fs, "latent_fingerprint",
                                {w.latent_fingerprint: w.latent_source for w in builds if w.latent_source})
    reused_texts = _load_rows(fs, "text_fingerprint",
                              {w.text_fingerprint: w.text_source for w in builds if w.text_source})
    to_encode = [w for w in builds if w.needs_pixels]
    for work in to_encode:
        if not isinstance(work.plan, DecodedClip):
            raise TypeError(f"{work.plan.video_path}: clip {work.plan.clip_index} needs the VAE but was not decoded")
    fresh_latents = dict(zip((id(w) for w in to_encode),
                             encode_latents(backbone, [w.plan for w in to_encode], batch_size), strict=True))
    fresh_texts = encode_texts(backbone, [w.plan.caption for w in builds if not w.text_source])
    records = []
    for work in builds:
        if work.latent_source:
            old = reused_latents[work.latent_fingerprint]
            latent = (old.latent_mean, old.latent_std)
        else:
            latent = fresh_latents[id(work)]
        if work.text_source:
            text = reused_texts[work.text_fingerprint].text_embedding
        else:
            text = fresh_texts[work.plan.caption]
        record = make_record(work.plan, latent, text, backbone.vae_id, backbone.text_encoder_id)
        if (record.latent_fingerprint, record.text_fingerprint) != (work.latent_fingerprint, work.text_fingerprint):
            raise ValueError(f"{work.plan.video_path}: the encoder's ids differ from the ones the run planned with "
                             "(the model changed during the run?)")
        records.append(record)
    return records


# --- writing a run's files ----------------------------------------------------------------------------
def _part_name() -> str:
    return f"part-{uuid.uuid4().hex[:16]}.parquet"


def write_records(store: IngestStore, folder: str, dataset: str, records: Sequence[CacheRecord]) -> DataFile:
    """One Parquet file of `records` under `<folder>/records/<dataset>/`; `folder` is relative to the root."""
    relative = posixpath.join(folder, "records", dataset, _part_name())
    _write_table(store, relative, records_to_table(list(records)))
    return DataFile(path=relative, rows=len(records), dataset=dataset)


def write_rejects(store: IngestStore, folder: str, rejects: Sequence[Reject]) -> DataFile:
    relative = posixpath.join(folder, "rejects", _part_name())
    table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rejects], schema=REJECT_SCHEMA)
    _write_table(store, relative, table)
    return DataFile(path=relative, rows=len(rejects))


def _write_table(store: IngestStore, relative: str, table: pa.Table) -> None:
    location = store.path(relative)
    store.fs.makedirs(posixpath.dirname(location), exist_ok=True)
    pq.write_table(table, location, filesystem=store.fs)


def _relocate(files: Iterable[DataFile], old_folder: str, new_folder: str) -> list[DataFile]:
    """The same files after their run folder was renamed."""
    return [file.model_copy(update={"path": posixpath.join(new_folder, posixpath.relpath(file.path, old_folder))})
            for file in files]


def read_rejects(uri: str) -> pa.Table:
    """All committed reject rows (REJECT_SCHEMA), oldest commit first."""
    store = IngestStore(uri)
    tables = [pq.read_table(store.path(f.path), filesystem=store.fs)
              for _, manifest in store.commits() for f in manifest.rejects]
    return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()


# --- reading a dataset --------------------------------------------------------------------------------
def parse_dataset_reference(reference: str) -> tuple[str, str]:
    """'<ingest output URI>#<dataset name>' -> (uri, name)."""
    uri, hash_sign, name = reference.rpartition("#")
    if not hash_sign or not uri or not _DATASET_NAME.match(name):
        raise ValueError(f"dataset reference {reference!r}: expected '<ingest output URI>#<dataset name>'")
    return uri, name


def _live_rows(store: IngestStore, files: Sequence[str], wanted: set[tuple[str, str]]) -> Iterable[pa.Table]:
    """Per committed file, its rows whose (latent, text) fingerprints are in `wanted`, each key once."""
    taken: set[tuple[str, str]] = set()
    for relative in files:
        table = pq.read_table(store.path(relative), filesystem=store.fs)
        keys = zip(table.column("latent_fingerprint").to_pylist(), table.column("text_fingerprint").to_pylist(),
                   strict=True)
        rows = []
        for row, key in enumerate(keys):
            if key in wanted and key not in taken:
                taken.add(key)
                rows.append(row)
        if rows:
            yield table.take(rows)


class DatasetReference(BaseModel):
    """A training config's `data: {dataset: "<ingest output URI>#<name>"}`: committed latents, no VAE in the loop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(description="'<ingest output URI>#<dataset name>'")
    concept: str | None = Field(None, description="Concept for package manifests; default: the committed one.")

    @field_validator("dataset")
    @classmethod
    def _is_a_reference(cls, value: str) -> str:
        parse_dataset_reference(value)
        return value

    def load(self, vae_id: str | None = None) -> list[CacheRecord]:
        records = read_ingested(*parse_dataset_reference(self.dataset), vae_id=vae_id)
        return [dataclasses.replace(r, concept=self.concept) for r in records] if self.concept else records


def read_ingested(uri: str, dataset_name: str, *, vae_id: str | None = None) -> list[CacheRecord]:
    """The committed records of one dataset, in (video_index, clip_index) order. Needs pyarrow + fsspec only.

    With `vae_id` (the training model's), refuses latents another VAE made. Text embeddings come from
    the same model folder/hub id, which vae_id includes.
    """
    store = IngestStore(uri)
    state = store.state()
    dataset = state.dataset(dataset_name)
    if vae_id is not None and dataset.vae_id != vae_id:
        raise ValueError(f"{uri}#{dataset_name} was encoded by {dataset.vae_id} (base {dataset.base!r}), but the "
                         f"training model's VAE is {vae_id}: train with that base or re-ingest with --base")
    if not dataset.clips:
        raise ValueError(f"{uri}#{dataset_name}: the dataset has no clips (its last ingest rejected every file)")
    wanted = {clip.key for clip in dataset.clips}
    rows = {(r.latent_fingerprint, r.text_fingerprint): r
            for table in _live_rows(store, state.record_files.get(dataset_name, []), wanted)
            for r in table_to_records(table)}
    missing = wanted - set(rows)
    if missing:
        raise ValueError(f"{uri}#{dataset_name}: {len(missing)} committed clips have no row in the committed "
                         "files (was the output edited by hand?)")
    records = [dataclasses.replace(rows[clip.key], video_path=clip.video_path, video_index=clip.video_index,
                                   clip_index=clip.clip_index, concept=dataset.concept, extra=dict(clip.extra))
               for clip in dataset.clips]
    return sorted(records, key=lambda r: (r.video_index, r.clip_index))


# --- pruning ------------------------------------------------------------------------------------------
def prune(uri: str) -> str | None:
    """Compact: one new commit holding only live rows, replacing all earlier commits; then delete the rest.

    Also deletes run folders no commit references (crashed runs). Do not run it while another
    ingest writes to the same output. Rejects tables of replaced commits are deleted with them.
    Returns the new commit's name, or None when nothing is committed.
    """
    store = IngestStore(uri)
    state = store.state()
    if not state.commit_names:
        return None
    run_id = new_run_id()
    temp = store.run_folder(run_id, temporary=True)
    files = []
    for name, dataset in state.datasets.items():
        for table in _live_rows(store, state.record_files.get(name, []), {c.key for c in dataset.clips}):
            relative = posixpath.join(temp, "records", name, _part_name())
            _write_table(store, relative, table)
            files.append(DataFile(path=relative, rows=table.num_rows, dataset=name))
    if files:
        store.publish_run(run_id)
    manifest = CommitManifest(run_id=run_id, committed_at=datetime.now(UTC),
                              records=_relocate(files, temp, store.run_folder(run_id)),
                              datasets=state.datasets, supersedes=state.commit_names,
                              summary={name: {"clips": len(d.clips)} for name, d in state.datasets.items()})
    committed = store.write_commit(manifest)
    for name in state.commit_names:
        store.fs.rm(store.path(posixpath.join(COMMITS, name)))
    runs = store.path(RUNS)
    for folder in store.fs.ls(runs, detail=False) if store.fs.isdir(runs) else []:
        if posixpath.basename(folder.rstrip("/")) != run_id:
            store.fs.rm(folder, recursive=True)
    return committed
