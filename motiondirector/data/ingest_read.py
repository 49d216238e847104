"""Reading ingested data: a dataset's committed records, the rejects, and `prune` (compaction).

Needs pyarrow + fsspec only (no Ray, no model): training reads a dataset with
`read_ingested(uri, name)`; a config names it as `data: {dataset: "<uri>#<name>"}` (data/reference.py).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from motiondirector.data.ingest_store import (
    COMMITS,
    REJECT_SCHEMA,
    RUNS,
    CommitManifest,
    DataFile,
    IngestStore,
    new_run_id,
    part_name,
    relocate,
    write_table,
)
from motiondirector.data.records import CacheRecord, table_to_records


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


def read_rejects(uri: str) -> pa.Table:
    """All committed reject rows (REJECT_SCHEMA), oldest commit first."""
    store = IngestStore(uri)
    tables = [pq.read_table(store.path(f.path), filesystem=store.fs)
              for _, manifest in store.commits() for f in manifest.rejects]
    return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()


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
            relative = posixpath.join(temp, "records", name, part_name())
            write_table(store, relative, table)
            files.append(DataFile(path=relative, rows=table.num_rows, dataset=name))
    if files:
        store.publish_run(run_id)
    manifest = CommitManifest(run_id=run_id, committed_at=datetime.now(UTC),
                              records=relocate(files, temp, store.run_folder(run_id)),
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
