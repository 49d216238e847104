"""Catalog index: build time, query latency and incremental reindex over synthetic manifests.

    .venv/bin/python bench/catalog.py                            # 10,000 entries in a temp folder
    .venv/bin/python bench/catalog.py --entries 2000 --root memory://bench
    .venv/bin/python bench/catalog.py --docs docs/benchmarks.md

Each synthetic entry is committed the way `Catalog.add` commits one (a small payload file, then the
manifest in one atomic write), with varied concept, kind, base, tags, metrics and captions; real
adapter weights would only slow down populating, not the index. Timed:
  - index build: `reindex()` over all entries, none indexed yet (reads and parses every manifest);
  - filtered query from the index (`fresh=False`): concept + kind + tag + metric threshold, sorted
    by a metric, first 20 — median of --repeats, the index already loaded by an earlier query;
  - the same query fresh (listing of the store merged with the index) and a substring search;
  - reindex after --new more entries: the set difference reads only the new manifests.
Targets (issue 5): filtered query < 50 ms from the index, reindex of 100 new entries < 2 s locally.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from motiondirector.catalog import Catalog, new_id
from motiondirector.lora.package import MANIFEST, BaseModelRef, Manifest
from motiondirector.storage import is_local

SECTION = "## Catalog"
CONCEPTS = ["car turn", "cycling", "golf swing", "dance", "skateboarding", "horse riding", "surfing", "lifting"]
BASES = [BaseModelRef(model_id="ali-vilab/text-to-video-ms-1.7b", architecture="unet3d-a"),
         BaseModelRef(model_id="cerspense/zeroscope_v2_576w", architecture="unet3d-b")]
QUERY = dict(concept="car turn", kind="temporal", tags=["best"], min_metrics={"clip": 0.25}, sort="-metrics.clip",
             limit=20)


def synthetic_manifest(index: int, catalog_id: str, payload_sha: str) -> Manifest:
    concept = CONCEPTS[index % len(CONCEPTS)]
    return Manifest(
        kind="spatial" if index % 3 == 0 else "temporal", base=BASES[index % 2], rank=32, alpha=32.0,
        targets=[f"up_blocks.{k}.temp_attentions.0.to_q" for k in range(4)], concept=concept,
        captions=[f"a {concept} video number {index}", f"clip {index % 17} of {concept}"],
        step=100 * (index % 50), metrics={"clip": (index * 7919 % 1000) / 2000, "motion": (index % 97) / 97},
        losses={"temporal": 0.1}, created_at=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=index),
        id=catalog_id, name=f"lora-{index}", sha256={"payload.bin": payload_sha},
        tags=["best"] if index % 5 == 0 else ["draft"], description=f"synthetic entry {index}",
        training_config={"lr": 5e-4, "steps": 300, "rank": 32})


def populate(catalog: Catalog, start: int, count: int) -> None:
    """Commit `count` entries: payload first, manifest last (the catalog's protocol)."""
    store = catalog.store
    for index in range(start, start + count):
        catalog_id, payload = new_id(), index.to_bytes(8, "little") * 8
        store.write_atomic(f"{store.entry(catalog_id)}/payload.bin", payload)
        manifest = synthetic_manifest(index, catalog_id, hashlib.sha256(payload).hexdigest())
        store.write_atomic(f"{store.entry(catalog_id)}/{MANIFEST}", manifest.model_dump_json().encode())


def timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def median_ms(action: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed(action)[0] for _ in range(repeats)) * 1000


def run(root: str, entries: int, new: int, repeats: int) -> dict[str, float]:
    catalog = Catalog(root)
    results: dict[str, float] = {}
    results["populate_s"], _ = timed(lambda: populate(catalog, 0, entries))
    results["build_s"], report = timed(catalog.reindex)
    assert report.rows == entries, report
    reader = Catalog(root)  # a new process would start like this: nothing loaded
    results["first_query_ms"] = timed(lambda: reader.query(fresh=False, **QUERY))[0] * 1000
    matches = reader.page(fresh=False, **QUERY).total
    results["matches"] = matches
    results["query_index_ms"] = median_ms(lambda: reader.query(fresh=False, **QUERY), repeats)
    results["search_index_ms"] = median_ms(lambda: reader.query(fresh=False, text="number 4242"), repeats)
    results["query_fresh_ms"] = median_ms(lambda: reader.query(**QUERY), repeats)
    populate(catalog, entries, new)
    results["query_fresh_unindexed_ms"] = timed(lambda: Catalog(root).query(**QUERY))[0] * 1000
    results["reindex_new_s"], report = timed(catalog.reindex)
    assert (report.added, report.rows) == (new, entries + new), report
    results["index_bytes"] = len(catalog.store.read_bytes(f"{catalog.store.index_dir}/{report.index_file}"))
    return results


def section(command: str, entries: int, new: int, root_kind: str, results: dict[str, float]) -> str:
    lines = [
        SECTION,
        "",
        f"`{command}` — {entries:,} synthetic manifests on a {root_kind} root; {platform.machine()}, "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} while it ran: a shared machine), "
        f"Python {platform.python_version()}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| index build (reindex of {entries:,} unindexed entries) | {results['build_s']:.2f} s | |",
        f"| index size | {results['index_bytes'] / 2**20:.1f} MiB | |",
        f"| first filtered query of a new reader (loads the index) | {results['first_query_ms']:.1f} ms | |",
        f"| filtered query from the index (median; {results['matches']:,} matches, top 20) | "
        f"{results['query_index_ms']:.1f} ms | < 50 ms |",
        f"| substring search from the index (median) | {results['search_index_ms']:.1f} ms | |",
        f"| filtered query, fresh (store listing merged with the index; median) | "
        f"{results['query_fresh_ms']:.1f} ms | |",
        f"| same, new reader, {new} entries not yet indexed | {results['query_fresh_unindexed_ms']:.1f} ms | |",
        f"| reindex after {new} new entries | {results['reindex_new_s']:.2f} s | < 2 s |",
        "",
        "Filtered query: concept + kind + tag + metric threshold, sorted by a metric, first page of 20.",
        "Fresh queries pay one listing of the store (here one directory scan; on S3 one paged LIST per",
        "1,000 objects); `--from-index` / `fresh=False` skips it and answers as of the last reindex.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=100, help="entries added before the incremental reindex")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--root", help="catalog root (fsspec URI; default: a fresh temp folder)")
    parser.add_argument("--docs", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="catalog-bench-") as scratch:
        root = args.root or str(Path(scratch) / "catalog")
        results = run(root, args.entries, args.new, args.repeats)
    root_kind = "local disk" if is_local(root) else root.split("://")[0]
    text = section(shlex.join(["python", "bench/catalog.py", *(argv if argv is not None else sys.argv[1:])]),
                   args.entries, args.new, root_kind, results)
    print(text)
    if args.docs:
        from report import replace_section  # bench/ is on sys.path when run as a script


        replace_section(args.docs, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
