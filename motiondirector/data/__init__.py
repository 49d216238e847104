"""Data: source files -> clips -> cache records. See docs/data.md.

Training calls `load_records(spec, backbone)` (the local record cache) or reads an ingested dataset
(`DatasetReference`, data/reference.py). Ray ingestion (pipelines/ingest.py) runs the stages of
data/ingest_plan.py, which call the same functions of data/encode.py per clip.
"""

from motiondirector.data.cache import cache_root, clear_cache, list_cache, load_records
from motiondirector.data.clips import ClipPolicy, closest_bucket, fit_frames, plan_clips
from motiondirector.data.encode import DecodedClip, decode_item, encode_clips, plan_item
from motiondirector.data.errors import DataError
from motiondirector.data.records import (
    RECORD_SCHEMA,
    CacheRecord,
    fingerprint,
    latent_fingerprint,
    records_to_table,
    table_to_records,
    text_fingerprint,
)
from motiondirector.data.sources import DatasetSpec, SourceItem, list_items
from motiondirector.data.video import VideoInfo, content_hash, probe_video, read_frames, read_image

__all__ = [
    "RECORD_SCHEMA", "CacheRecord", "ClipPolicy", "DataError", "DatasetSpec", "DecodedClip", "SourceItem",
    "VideoInfo", "cache_root", "clear_cache", "closest_bucket", "content_hash", "decode_item", "encode_clips",
    "fingerprint", "fit_frames", "latent_fingerprint", "list_cache", "list_items", "load_records", "plan_clips",
    "plan_item", "probe_video", "read_frames", "read_image", "records_to_table", "table_to_records",
    "text_fingerprint",
]
