"""The cache record and the fingerprint function: one format for the whole system.

A record is one training clip after encoding: the VAE latent distribution (mean and std, unscaled,
float16; training samples from it each step and applies the model's scaling factor), the text
embedding, and where it came from. The local cache and Ray ingestion write the same records to
Parquet (binary + shape + dtype columns, readable with pyarrow alone).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa


def fingerprint(*parts: Any) -> str:
    """The one fingerprint function: sha256 of the canonical JSON of `parts`, as 32 hex chars."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def latent_fingerprint(content_hash: str, frame_indices: list[int], size: tuple[int, int], crop: str,
                       vae_id: str) -> str:
    """Identity of an encoded clip: the same video bytes, frames, geometry and VAE give the same latents."""
    return fingerprint("latent", content_hash, list(map(int, frame_indices)), list(size), crop, vae_id)


def text_fingerprint(caption: str, text_encoder_id: str) -> str:
    """Identity of a text embedding: caption + tokenizer/text encoder."""
    return fingerprint("text", caption, text_encoder_id)


@dataclass
class CacheRecord:
    """One encoded clip. Arrays are numpy: latents (C, F, h, w) float16, text (L, D) float16."""

    dataset: str
    video_path: str
    video_index: int  # position in the dataset's sorted file list (routes per-video spatial LoRAs)
    content_hash: str  # sha256 of the source file's bytes
    clip_index: int
    frame_indices: list[int]
    source_fps: float
    caption: str
    size: tuple[int, int]  # (height, width) of the frames that were encoded
    crop: str  # how frames were fitted to `size` (e.g. "center", "bucket")
    latent_mean: np.ndarray
    latent_std: np.ndarray
    text_embedding: np.ndarray
    latent_fingerprint: str
    text_fingerprint: str
    concept: str | None = None
    is_image: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.latent_mean.shape[1])


# --- Parquet: the one on-disk/in-flight form of records (local cache and Ray ingestion) ----------
# Each array is three columns: <name> (raw little-endian bytes), <name>_shape, <name>_dtype, so any
# pyarrow reader can rebuild it with numpy.frombuffer(...).reshape(shape). `extra` is JSON text.
_ARRAY_FIELDS = ("latent_mean", "latent_std", "text_embedding")

RECORD_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("concept", pa.string()),
    pa.field("video_path", pa.string(), nullable=False),
    pa.field("video_index", pa.int64(), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("clip_index", pa.int64(), nullable=False),
    pa.field("frame_indices", pa.list_(pa.int64()), nullable=False),
    pa.field("source_fps", pa.float64(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("size", pa.list_(pa.int32()), nullable=False),
    pa.field("crop", pa.string(), nullable=False),
    *[pa.field(f"{name}{suffix}", kind, nullable=False) for name in _ARRAY_FIELDS
      for suffix, kind in (("", pa.large_binary()), ("_shape", pa.list_(pa.int32())), ("_dtype", pa.string()))],
    pa.field("latent_fingerprint", pa.string(), nullable=False),
    pa.field("text_fingerprint", pa.string(), nullable=False),
    pa.field("is_image", pa.bool_(), nullable=False),
    pa.field("extra", pa.string(), nullable=False),
])
# The columns that describe records without their arrays (cheap to read for listings).
METADATA_COLUMNS = tuple(f.name for f in RECORD_SCHEMA if not f.name.startswith(_ARRAY_FIELDS))


def _array_columns(name: str, array: np.ndarray) -> dict[str, Any]:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {name: little.tobytes(), f"{name}_shape": list(array.shape), f"{name}_dtype": array.dtype.name}


def _array_from(row: dict[str, Any], name: str) -> np.ndarray:
    dtype = np.dtype(row[f"{name}_dtype"]).newbyteorder("<")
    array = np.frombuffer(row[name], dtype=dtype).reshape(row[f"{name}_shape"])
    return array.astype(array.dtype.newbyteorder("="))  # a native-order, writable copy


def records_to_table(records: list[CacheRecord]) -> pa.Table:
    """Records -> a pyarrow Table with RECORD_SCHEMA (round-trips exactly through table_to_records)."""
    rows = []
    for record in records:
        row = {name: getattr(record, name) for name in METADATA_COLUMNS if name not in ("size", "extra")}
        row["size"] = list(record.size)
        row["extra"] = json.dumps(record.extra, sort_keys=True)
        for name in _ARRAY_FIELDS:
            row.update(_array_columns(name, getattr(record, name)))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def table_to_records(table: pa.Table) -> list[CacheRecord]:
    """A Table with RECORD_SCHEMA's columns (any order, extra columns ignored) -> records."""
    missing = [name for name in RECORD_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not a cache record table: missing columns {missing}")
    records = []
    for row in table.select(RECORD_SCHEMA.names).to_pylist():
        arrays = {name: _array_from(row, name) for name in _ARRAY_FIELDS}
        fields = {name: row[name] for name in METADATA_COLUMNS}
        fields["size"] = tuple(row["size"])
        fields["extra"] = json.loads(row["extra"])
        records.append(CacheRecord(**fields, **arrays))
    return records
