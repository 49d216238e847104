"""Skip planning for ingestion: decide per clip what a run must do, then do only that.

Each planned clip is kept (its dataset already has a committed row with both fingerprints), or
built from committed rows of any dataset holding the same latent or text fingerprint (no pixels,
no VAE), or encoded. The stages, in the order the Ray driver (pipelines/ingest.py) runs them:
`plan_works` (CPU, header and hash only) -> `decode_works` (CPU, only the clips the VAE needs) ->
`build_records` (the model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import fsspec
import pyarrow.parquet as pq

from motiondirector.data.encode import (
    ClipPlan,
    DecodedClip,
    decode_plans,
    encode_latents,
    encode_texts,
    make_record,
    plan_item,
)
from motiondirector.data.ingest_store import CommittedState, LiveClip
from motiondirector.data.records import CacheRecord, table_to_records
from motiondirector.data.sources import DatasetSpec, SourceItem


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

    @classmethod
    def committed(cls, state: CommittedState) -> RowIndex:
        """Which rows are committed, read from the fingerprint columns of every committed file."""
        index = cls()
        for files in state.record_files.values():
            for relative in files:
                location = state.store.path(relative)
                table = pq.read_table(location, filesystem=state.store.fs,
                                      columns=["dataset", "latent_fingerprint", "text_fingerprint"])
                index.add(location, table.column("dataset").to_pylist(),
                          table.column("latent_fingerprint").to_pylist(), table.column("text_fingerprint").to_pylist())
        return index

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
