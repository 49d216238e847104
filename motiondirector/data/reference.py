"""A reference to an ingested dataset: '<ingest output URI>#<dataset name>'.

A training config's `data: {dataset: "<URI>#<name>"}` is a `DatasetReference`. This module needs
pydantic only, so validating a config does not load the ingest store; `DatasetReference.load`
reads the committed records (data/ingest_read.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from motiondirector.data.records import CacheRecord

# Dataset names become folder names and the `#name` part of references.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_dataset_reference(reference: str) -> tuple[str, str]:
    """'<ingest output URI>#<dataset name>' -> (uri, name)."""
    uri, hash_sign, name = reference.rpartition("#")
    if not hash_sign or not uri or not DATASET_NAME.match(name):
        raise ValueError(f"dataset reference {reference!r}: expected '<ingest output URI>#<dataset name>'")
    return uri, name


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
        from motiondirector.data.ingest_read import read_ingested  # pyarrow + fsspec: only when reading

        records = read_ingested(*parse_dataset_reference(self.dataset), vae_id=vae_id)
        return [dataclasses.replace(r, concept=self.concept) for r in records] if self.concept else records
