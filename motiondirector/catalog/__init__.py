"""The LoRA catalog on any fsspec storage (docs/catalog.md).

    from motiondirector.catalog import Catalog
    catalog = Catalog("s3://bucket/loras")       # or a local path; default $MOTIONDIRECTOR_CATALOG
    manifest = catalog.add("runs/car/temporal", tags=["car"])
    folder = catalog.resolve(manifest.id)          # a local folder with the package, hashes checked
"""

from motiondirector.catalog.catalog import Catalog, Page, ReindexReport, catalog_root
from motiondirector.catalog.entry import CorruptEntryError, UnknownEntryError
from motiondirector.catalog.ids import InvalidIdError, is_catalog_id, new_id, validate_id
from motiondirector.catalog.maintenance import GcReport, Problem, VerifyReport
from motiondirector.catalog.ondemand import CatalogOnDemand
from motiondirector.catalog.runs import is_run_folder, register_run

__all__ = ["Catalog", "CatalogOnDemand", "CorruptEntryError", "GcReport", "InvalidIdError", "Page", "Problem", "ReindexReport",
           "UnknownEntryError", "VerifyReport", "catalog_root", "is_catalog_id", "is_run_folder", "new_id",
           "register_run", "validate_id"]
