"""A catalog opened only when a LoRA reference needs it (a reference that is not a local path).

Commands and services take `--catalog URI` but most references are local folders; opening a
catalog on S3 costs a listing, so it happens at the first catalog id resolved.
"""

from __future__ import annotations

from pathlib import Path

from motiondirector.catalog.catalog import Catalog


class CatalogOnDemand:
    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.uri)
        return self._catalog

    def resolve(self, entry_id: str) -> Path:
        return self.catalog.resolve(entry_id)
