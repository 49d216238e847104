"""The ingest commit store: an ingestion output on any fsspec filesystem and its commit protocol.

Layout under the output URI::

    commits/<committed-at>-<run_id>.json     commit manifests: the ONLY thing readers trust
    runs/<run_id>.tmp/                         a run in progress (or one that crashed): never read
    runs/<run_id>/records/<dataset>/part-*.parquet   cache records (RECORD_SCHEMA), partitioned by dataset
    runs/<run_id>/rejects/part-*.parquet       files that could not be used (REJECT_SCHEMA)

A run writes into its `.tmp` folder, renames it, then writes its manifest last (temp + rename locally,
one PUT on object stores). Each manifest lists its data files and, per dataset it ingested, the clips
the dataset has now ("live" clips: fingerprints + where they sit in the dataset). A dataset's current
state is the live list of the latest commit that mentions it; rows in older files that are not live
are superseded and stay until `prune` (data/ingest_read.py), which writes one compacted commit
replacing all earlier ones.

No Ray here: the Ray driver (pipelines/ingest.py) calls these functions; the spec is in
data/ingest_spec.py, the skip planning in data/ingest_plan.py, the reader in data/ingest_read.py.
"""

from __future__ import annotations

import dataclasses
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from motiondirector.data.errors import DataError
from motiondirector.data.records import CacheRecord, records_to_table
from motiondirector.errors import describe_validation_error
from motiondirector.storage import is_local, publish

if TYPE_CHECKING:
    from motiondirector.data.encode import ClipPlan

COMMITS = "commits"
RUNS = "runs"
TEMP_SUFFIX = ".tmp"
COMMIT_KIND = "motiondirector-ingest-commit"
SCHEMA_VERSION = 1

REJECT_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # list (a source) | plan (header, hash) | decode (frames)
    pa.field("reason", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),  # "<ExceptionType>: <message>"
])


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
                raise ValueError(f"{location}: {describe_validation_error(error, CommitManifest)}") from None
        superseded = {old for _, manifest in manifests for old in manifest.supersedes}
        return [(name, manifest) for name, manifest in manifests if name not in superseded]

    def write_commit(self, manifest: CommitManifest) -> str:
        """Publish a manifest: the commit point of a run. Returns its file name."""
        name = f"{manifest.committed_at:%Y%m%dT%H%M%S%f}-{manifest.run_id}.json"
        publish(self.path(posixpath.join(COMMITS, name)), manifest.model_dump_json(indent=2).encode(), self.fs)
        return name

    def state(self) -> CommittedState:
        return CommittedState.of(self, self.commits())

    # runs -----------------------------------------------------------------------------------------
    def publish_run(self, run_id: str) -> None:
        """Rename runs/<id>.tmp to runs/<id> (a copy on object stores); still invisible until committed."""
        temp, final = self.path(self.run_folder(run_id, temporary=True)), self.path(self.run_folder(run_id))
        if not self.fs.exists(temp):  # a run that only changed live lists wrote no files
            return
        if is_local(self.uri):
            self.fs.mv(temp, final, recursive=True)
            return
        # Object stores have no folders: copy the files, then delete them (a recursive `mv` also copies
        # the listing's pseudo-directories, which S3 answers with NoSuchKey).
        self.fs.invalidate_cache(temp)  # written by other processes (Ray tasks) than this one
        files = self.fs.find(temp)
        self.fs.copy(files, [final + name[len(temp):] for name in files])
        self.fs.rm(files)

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
            run_id=run_id, committed_at=datetime.now(UTC), records=relocate(records, temp, folder),
            rejects=relocate(reject_files, temp, folder), datasets=changed, summary=summary or {}))


@dataclasses.dataclass
class CommittedState:
    """What the committed manifests say: each dataset's latest state and every committed file."""

    store: IngestStore
    datasets: dict[str, DatasetState]
    record_files: dict[str, list[str]]  # dataset -> relative paths, commit order
    commit_names: list[str]

    @classmethod
    def of(cls, store: IngestStore, commits: Sequence[tuple[str, CommitManifest]]) -> CommittedState:
        datasets: dict[str, DatasetState] = {}
        files: dict[str, list[str]] = {}
        for _, manifest in commits:
            datasets.update(manifest.datasets)
            for data_file in manifest.records:
                files.setdefault(str(data_file.dataset), []).append(data_file.path)
        return cls(store, datasets, files, [name for name, _ in commits])

    def dataset(self, name: str) -> DatasetState:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ValueError(f"{self.store.uri}: no committed dataset {name!r} (committed: {known})")
        return self.datasets[name]


# --- a run's files ----------------------------------------------------------------------------------
def part_name() -> str:
    return f"part-{uuid.uuid4().hex[:16]}.parquet"


def write_records(store: IngestStore, folder: str, dataset: str, records: Sequence[CacheRecord]) -> DataFile:
    """One Parquet file of `records` under `<folder>/records/<dataset>/`; `folder` is relative to the root."""
    relative = posixpath.join(folder, "records", dataset, part_name())
    write_table(store, relative, records_to_table(list(records)))
    return DataFile(path=relative, rows=len(records), dataset=dataset)


def write_rejects(store: IngestStore, folder: str, rejects: Sequence[Reject]) -> DataFile:
    relative = posixpath.join(folder, "rejects", part_name())
    table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rejects], schema=REJECT_SCHEMA)
    write_table(store, relative, table)
    return DataFile(path=relative, rows=len(rejects))


def write_table(store: IngestStore, relative: str, table: pa.Table) -> None:
    location = store.path(relative)
    store.fs.makedirs(posixpath.dirname(location), exist_ok=True)
    pq.write_table(table, location, filesystem=store.fs)


def relocate(files: Iterable[DataFile], old_folder: str, new_folder: str) -> list[DataFile]:
    """The same files after their run folder was renamed."""
    return [file.model_copy(update={"path": posixpath.join(new_folder, posixpath.relpath(file.path, old_folder))})
            for file in files]
