"""The catalog index: one Parquet row per committed entry, and the queries over it.

The index is a cache, never the truth: the committed manifests are. A snapshot is refreshed by the
set difference of committed ids and indexed ids (object stores give no reliable timestamps), so any
snapshot, however old, becomes exact after merging it with the entries committed since and dropping
the ones removed since. That is also why concurrent `reindex` runs are safe: each writes a complete
snapshot under a fresh name and switches the pointer; whichever switch lands last is as good as any.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from motiondirector.lora.package import Manifest

INDEX_VERSION = 1

INDEX_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("error", pa.string()),  # why the manifest was rejected; null for valid entries
    ("name", pa.string()),
    ("kind", pa.string()),
    ("concept", pa.string()),
    ("base_model_id", pa.string()),
    ("base_architecture", pa.string()),
    ("rank", pa.int64()),
    ("step", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("run_id", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("metrics", pa.map_(pa.string(), pa.float64())),
    ("content_sha256", pa.string()),
    ("search_text", pa.string()),  # lower-cased name, concept, captions and description
    ("manifest_json", pa.string()),  # the whole manifest: results need no second read
])

# Sortable columns; metrics sort as "metrics.<name>".
SORT_COLUMNS = ("id", "name", "kind", "concept", "rank", "step", "created_at")


def content_digest(file_hashes: Mapping[str, str], preview: str | None = None) -> str:
    """Identity of a package's content: the hashes of its files, without the catalog's preview."""
    content = {name: digest for name, digest in file_hashes.items() if name != preview}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def manifest_row(manifest: Manifest) -> dict:
    searchable = [manifest.name or "", manifest.concept or "", *manifest.captions, manifest.description or ""]
    return {
        "id": manifest.id,
        "error": None,
        "name": manifest.name,
        "kind": manifest.kind,
        "concept": manifest.concept,
        "base_model_id": manifest.base.model_id,
        "base_architecture": manifest.base.architecture,
        "rank": manifest.rank,
        "step": manifest.step,
        "created_at": manifest.created_at.astimezone(UTC),
        "run_id": manifest.run_id,
        "tags": list(manifest.tags),
        "metrics": dict(manifest.metrics),
        "content_sha256": content_digest(manifest.sha256, manifest.preview),
        "search_text": "\n".join(searchable).lower(),
        "manifest_json": manifest.model_dump_json(),
    }


def invalid_row(catalog_id: str, error: str) -> dict:
    return {"id": catalog_id, "error": error}


def rows_table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=INDEX_SCHEMA)


def empty_table() -> pa.Table:
    return INDEX_SCHEMA.empty_table()


def to_parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def from_parquet(data: bytes) -> pa.Table | None:
    """The table, or None when it was written with another schema (then it is rebuilt)."""
    table = pq.read_table(pa.BufferReader(data))
    return table if table.schema.equals(INDEX_SCHEMA) else None


def pointer_bytes(index_file: str, rows: int) -> bytes:
    return json.dumps({"version": INDEX_VERSION, "index": index_file, "rows": rows,
                       "written_at": datetime.now(UTC).isoformat()}).encode()


def pointer_target(data: bytes) -> str | None:
    """The index file a pointer names, or None for a pointer of another version or an unreadable one."""
    try:
        pointer = json.loads(data)
    except ValueError:
        return None
    if not isinstance(pointer, dict) or pointer.get("version") != INDEX_VERSION:
        return None
    target = pointer.get("index")
    return target if isinstance(target, str) and "/" not in target else None


@dataclass(frozen=True)
class Filters:
    """What `Catalog.query` selects; every field left empty selects everything."""

    concept: str | None = None  # case-insensitive equality
    kind: str | None = None
    base: str | None = None  # base model id or architecture fingerprint
    tags: tuple[str, ...] = ()  # entries having all of them
    min_metrics: Mapping[str, float] = field(default_factory=dict)  # metric >= value
    created_after: datetime | None = None
    created_before: datetime | None = None
    text: str | None = None  # case-insensitive substring of name, concept, captions, description


def _utc(moment: datetime) -> pa.Scalar:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return pa.scalar(moment.astimezone(UTC), type=INDEX_SCHEMA.field("created_at").type)


def _has_all_tags(tags: pa.ChunkedArray, wanted: tuple[str, ...]) -> np.ndarray:
    lists = tags.combine_chunks()
    flat, parents = pc.list_flatten(lists), pc.list_parent_indices(lists)
    mask = np.ones(len(lists), dtype=bool)
    for tag in wanted:
        has_tag = np.zeros(len(lists), dtype=bool)
        has_tag[pc.filter(parents, pc.equal(flat, tag)).to_numpy()] = True
        mask &= has_tag
    return mask


def select(table: pa.Table, filters: Filters) -> pa.Table:
    """Valid entries matching `filters` (rejected manifests are never results)."""
    masks = [pc.is_null(table["error"])]
    if filters.concept is not None:
        masks.append(pc.equal(pc.utf8_lower(table["concept"]), filters.concept.lower()))
    if filters.kind is not None:
        masks.append(pc.equal(table["kind"], filters.kind))
    if filters.base is not None:
        masks.append(pc.or_(pc.equal(table["base_model_id"], filters.base),
                            pc.equal(table["base_architecture"], filters.base)))
    if filters.tags:
        masks.append(pa.array(_has_all_tags(table["tags"], tuple(filters.tags))))
    for metric, threshold in filters.min_metrics.items():
        masks.append(pc.greater_equal(pc.map_lookup(table["metrics"], metric, "first"), float(threshold)))
    if filters.created_after is not None:
        masks.append(pc.greater_equal(table["created_at"], _utc(filters.created_after)))
    if filters.created_before is not None:
        masks.append(pc.less(table["created_at"], _utc(filters.created_before)))
    if filters.text:
        masks.append(pc.match_substring(table["search_text"], filters.text.lower()))
    mask = masks[0]
    for extra in masks[1:]:
        mask = pc.and_kleene(mask, extra)
    # A null (e.g. a missing metric) does not match.
    return table.filter(pc.fill_null(mask, False))


def sort_key_column(table: pa.Table, key: str) -> pa.ChunkedArray | pa.Array:
    if key.startswith("metrics."):
        return pc.map_lookup(table["metrics"], key.removeprefix("metrics."), "first")
    if key not in SORT_COLUMNS:
        raise ValueError(f"sort key {key!r}: expected one of {', '.join(SORT_COLUMNS)} or metrics.<name>, "
                         "with a leading '-' for descending")
    return table[key]


def order(table: pa.Table, sort: str) -> pa.Table:
    """Sort by `sort` ('-' prefix: descending), ties by id; entries lacking the key go last."""
    descending = sort.startswith("-")
    key = sort.removeprefix("-")
    keys = pa.table({"key": sort_key_column(table, key), "id": table["id"]})
    indices = pc.sort_indices(keys, sort_keys=[("key", "descending" if descending else "ascending", "at_end"),
                                               ("id", "ascending", "at_end")])
    return table.take(indices)


def manifests(table: pa.Table) -> list[Manifest]:
    return [Manifest.model_validate_json(text) for text in table["manifest_json"].to_pylist()]
