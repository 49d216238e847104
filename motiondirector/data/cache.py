"""The local record cache: Parquet files keyed by fingerprints, so nothing is encoded twice.

Layout: `<root>/records/<dataset>/<latent_fp>-<text_fp>.parquet`, one record per file, written
under a temp name and renamed. Latents and text embeddings are reused independently and across
datasets: a new caption re-encodes only the text, a new size only the latents.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from motiondirector.data.encode import (
    decode_plans,
    encode_latents,
    encode_texts,
    make_record,
    plan_item,
)
from motiondirector.data.records import METADATA_COLUMNS, CacheRecord, records_to_table, table_to_records
from motiondirector.data.sources import DatasetSpec, list_items
from motiondirector.events import Observer, Progress, emit
from motiondirector.storage import atomic_write, cache_root

RECORDS_DIR = "records"
_SUFFIX = ".parquet"


def dataset_folder_name(dataset: str) -> str:
    """A dataset name as a single safe folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"


def record_filename(latent_fp: str, text_fp: str) -> str:
    return f"{latent_fp}-{text_fp}{_SUFFIX}"


def write_record(path: Path, record: CacheRecord) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(records_to_table([record]), sink)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, sink.getvalue().to_pybytes())


def read_record(path: Path) -> CacheRecord:
    return table_to_records(pq.read_table(path))[0]


Latent = tuple[np.ndarray, np.ndarray]


class _Store:
    """The records on disk, indexed by fingerprint: which file holds a latent or a text embedding."""

    def __init__(self, records_dir: Path) -> None:
        self.records_dir = records_dir
        self.files: set[Path] = set()
        self.by_latent: dict[str, Path] = {}
        self.by_text: dict[str, Path] = {}
        self.loaded: dict[Path, CacheRecord] = {}
        for path in sorted(records_dir.glob(f"*/*{_SUFFIX}")):
            self._index(path)

    def _index(self, path: Path) -> None:
        latent_fp, _, text_fp = path.name[:-len(_SUFFIX)].partition("-")
        self.files.add(path)
        self.by_latent.setdefault(latent_fp, path)
        self.by_text.setdefault(text_fp, path)

    def _record(self, path: Path) -> CacheRecord:
        if path not in self.loaded:
            self.loaded[path] = read_record(path)
        return self.loaded[path]

    def find(self, path: Path, latent_fp: str, text_fp: str) -> tuple[Latent | None, np.ndarray | None]:
        """The cached latent and text embedding for these fingerprints, from any dataset (None: not cached)."""
        latent_file = path if path in self.files else self.by_latent.get(latent_fp)
        text_file = path if path in self.files else self.by_text.get(text_fp)
        latent = None
        if latent_file:
            stored = self._record(latent_file)
            latent = (stored.latent_mean, stored.latent_std)
        return latent, self._record(text_file).text_embedding if text_file else None

    def add(self, path: Path, record: CacheRecord) -> None:
        write_record(path, record)
        self._index(path)


def load_records(spec: DatasetSpec, backbone, cache_dir: str | os.PathLike | None = None,
                 observers: Sequence[Observer] = ()) -> list[CacheRecord]:
    """The dataset's records in (video_index, clip_index) order, encoding only what the cache lacks.

    Reports `Progress("cache", done, total, label)` to `observers`, for reading the sources and for
    encoding their clips. Raises DataError naming the file for a bad source (zero-byte, corrupt, too
    short, ...).
    """
    spec = spec.with_model_defaults(backbone.defaults)
    vae_id, text_encoder_id = backbone.vae_id, backbone.text_encoder_id
    store = _Store(cache_root(cache_dir) / RECORDS_DIR)
    folder = store.records_dir / dataset_folder_name(spec.name)
    texts: dict[str, np.ndarray] = {}  # captions encoded in this call
    result: list[CacheRecord] = []
    items = list_items(spec)
    label = f"{spec.name}: reading sources"
    emit(observers, Progress("cache", 0, len(items), label))
    plans_per_item = []
    for item in items:
        plans_per_item.append(plan_item(item, spec))
        emit(observers, Progress("cache", len(plans_per_item), len(items), label))
    label, total = f"{spec.name}: encoding clips", sum(map(len, plans_per_item))
    emit(observers, Progress("cache", 0, total, label))
    for plans in plans_per_item:  # one file at a time: only its frames are in memory
        keys = [(plan.latent_fingerprint(vae_id), plan.text_fingerprint(text_encoder_id)) for plan in plans]
        paths = [folder / record_filename(*key) for key in keys]
        found = [store.find(path, *key) for path, key in zip(paths, keys, strict=True)]
        to_encode = [plan for plan, (latent, _) in zip(plans, found, strict=True) if latent is None]
        new_latents = iter(encode_latents(backbone, decode_plans(to_encode)) if to_encode else [])
        new_captions = {plan.caption for plan, (_, text) in zip(plans, found, strict=True)
                        if text is None and plan.caption not in texts}
        if new_captions:
            texts.update(encode_texts(backbone, sorted(new_captions)))
        for plan, path, (latent, text) in zip(plans, paths, found, strict=True):
            record = make_record(plan, next(new_latents) if latent is None else latent,
                                 texts[plan.caption] if text is None else text, vae_id, text_encoder_id)
            if path not in store.files:
                store.add(path, record)
            result.append(record)
            emit(observers, Progress("cache", len(result), total, label))
    return sorted(result, key=lambda r: (r.video_index, r.clip_index))


@dataclass(frozen=True)
class DatasetSummary:
    """One dataset in the cache, for `motiondirector cache ls`."""

    dataset: str
    folder: str
    videos: int
    clips: int
    bytes: int
    latent_fingerprints: list[str]
    text_fingerprints: list[str]


def list_cache(cache_dir: str | os.PathLike | None = None) -> list[DatasetSummary]:
    """What the cache holds, per dataset (reads only the metadata columns)."""
    records_dir = cache_root(cache_dir) / RECORDS_DIR
    summaries = []
    for folder in sorted(p for p in records_dir.glob("*") if p.is_dir()):
        files = sorted(folder.glob(f"*{_SUFFIX}"))
        if not files:
            continue
        names, videos = set(), set()
        for path in files:
            row = pq.read_table(path, columns=list(METADATA_COLUMNS)).slice(0, 1).to_pylist()[0]
            names.add(row["dataset"])
            videos.add(row["content_hash"])
        latent_fps = sorted({p.name.split("-")[0] for p in files})
        text_fps = sorted({p.name[:-len(_SUFFIX)].split("-")[1] for p in files})
        summaries.append(DatasetSummary(dataset=", ".join(sorted(names)), folder=folder.name, videos=len(videos),
                                        clips=len(files), bytes=sum(p.stat().st_size for p in files),
                                        latent_fingerprints=latent_fps, text_fingerprints=text_fps))
    return summaries


def clear_cache(cache_dir: str | os.PathLike | None = None, dataset: str | None = None) -> int:
    """Delete cached records (all, or one dataset's); returns how many record files were removed."""
    records_dir = cache_root(cache_dir) / RECORDS_DIR
    folders = [records_dir / dataset_folder_name(dataset)] if dataset else \
        [p for p in records_dir.glob("*") if p.is_dir()]
    removed = 0
    for folder in folders:
        if folder.is_dir():
            removed += sum(1 for _ in folder.glob(f"*{_SUFFIX}"))
            shutil.rmtree(folder)
    return removed
