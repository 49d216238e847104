"""The commit protocol under crashes, concurrency and corruption — on a local path and on S3.

S3 is a moto server on loopback reached through s3fs (tests/s3_server.py): object stores have no
rename, so "files first, manifest last in one PUT" must hold there as well.

Writers are forked processes: forking the already-imported test process costs nothing, where a fresh
interpreter would spend seconds importing torch and peft. fsspec resets its IO loop and instance
cache in a forked child, so each child opens its own S3 connections.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from s3_server import s3_endpoint, s3_root  # noqa: F401 — fixtures
from test_catalog import make_package
from typer.testing import CliRunner

from motiondirector.catalog import Catalog, CorruptEntryError
from motiondirector.lora.package import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_package

FORK = multiprocessing.get_context("fork")
WRITERS, ENTRIES_PER_WRITER = 4, 25


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "catalog")
    return request.getfixturevalue("s3_root")


@pytest.fixture()
def catalog(root, tmp_path) -> Catalog:
    return Catalog(root, resolve_cache=tmp_path / "resolved")


@pytest.fixture()
def spawn():
    """Start forked processes that are killed at teardown if a failing test left them running."""
    started = []

    def start(target, *args):
        process = FORK.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.is_alive():
            process.kill()
            process.join(10)


# ---- processes ---------------------------------------------------------------------------------------


def _write_entries(root: str, package: Path, worker: int, results, reindexed) -> None:
    catalog = Catalog(root)
    ids = []
    for i in range(ENTRIES_PER_WRITER):
        if i == ENTRIES_PER_WRITER // 2:  # half-way, let an index be written in the middle of the writes
            deadline = time.monotonic() + 60
            while reindexed.value == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        ids.append(catalog.add(package, name=f"w{worker}-{i}", tags=[f"worker-{worker}"]).id)
    results.put((worker, ids))


def _reindex_until(root: str, stop, reindexed) -> None:
    catalog = Catalog(root)
    while not stop.wait(0.2):  # a pause, so that the single-process S3 server mostly serves the writers
        catalog.reindex()
        with reindexed.get_lock():
            reindexed.value += 1


def _hang_before_commit(root: str, package: Path, ready) -> None:
    catalog = Catalog(root)

    def hang(manifest) -> None:  # all files are written; the manifest would go next
        ready.set()
        time.sleep(600)

    catalog._commit = hang
    catalog.add(package)


def _add_forever(root: str, package: Path, committed) -> None:
    catalog = Catalog(root)
    while True:
        catalog.add(package)
        with committed.get_lock():
            committed.value += 1


def _finish(process, timeout: float = 120) -> None:
    process.join(timeout)
    if process.is_alive():
        process.kill()
        pytest.fail(f"process {process.pid} did not finish in {timeout} s")


# ---- tests -------------------------------------------------------------------------------------------


def test_concurrent_writers_and_reindexers_lose_nothing_and_duplicate_nothing(catalog, root, tmp_path, spawn):
    packages = [make_package(tmp_path / f"pkg{w}", w) for w in range(WRITERS)]
    results, stop, reindexed = FORK.Queue(), FORK.Event(), FORK.Value("i", 0)
    reindexers = [spawn(_reindex_until, root, stop, reindexed) for _ in range(2)]
    writers = [spawn(_write_entries, root, packages[w], w, results, reindexed) for w in range(WRITERS)]
    written = dict(results.get(timeout=300) for _ in writers)
    assert reindexed.value > 0  # the index was rewritten while entries were being added
    for process in writers:
        _finish(process)
        assert process.exitcode == 0
    stop.set()
    for process in reindexers:
        _finish(process)
        assert process.exitcode == 0

    all_ids = [catalog_id for ids in written.values() for catalog_id in ids]
    assert len(all_ids) == len(set(all_ids)) == WRITERS * ENTRIES_PER_WRITER
    listed = [m.id for m in catalog.query()]
    assert sorted(listed) == sorted(all_ids)  # each exactly once, whatever the last reindex saw
    for worker, ids in written.items():
        assert sorted(m.id for m in catalog.query(tags=[f"worker-{worker}"])) == sorted(ids)
    catalog.reindex()
    indexed = [m.id for m in Catalog(root).query(fresh=False)]
    assert sorted(indexed) == sorted(all_ids)
    assert catalog.verify().ok


def test_a_writer_killed_before_its_manifest_leaves_nothing_visible_and_gc_cleans_it(catalog, root, tmp_path,
                                                                                     spawn):
    kept = catalog.add(make_package(tmp_path / "kept", 1))
    ready = FORK.Event()
    writer = spawn(_hang_before_commit, root, make_package(tmp_path / "doomed", 2), ready)
    assert ready.wait(60), "the writer never reached its commit"
    os.kill(writer.pid, signal.SIGKILL)
    _finish(writer)
    assert writer.exitcode == -signal.SIGKILL

    entries = catalog.store.entry_ids()
    orphan = next(catalog_id for catalog_id, committed in entries.items() if not committed)
    assert len(catalog.store.files(catalog.store.entry(orphan))) == 2  # its files are all there ...
    assert [m.id for m in catalog.query()] == [kept.id]  # ... yet readers do not see it
    assert catalog.reindex().rows == 1 and catalog.verify().ok
    with pytest.raises(KeyError):
        catalog.get(orphan)

    patient = catalog.gc(grace_seconds=3600)
    assert patient.removed_entries == [] and patient.pending == [orphan]
    assert catalog.gc(grace_seconds=0, dry_run=True).removed_entries == [orphan]
    assert orphan in catalog.store.entry_ids()
    assert catalog.gc(grace_seconds=0).removed_entries == [orphan]
    assert catalog.store.entry_ids() == {kept.id: True}


def test_a_writer_killed_at_any_moment_leaves_only_complete_entries(catalog, root, tmp_path, spawn):
    # Big enough weights (~1 MB) that most of the writer's time is spent inside an upload.
    package = make_package(tmp_path / "pkg", 3, rank=64, width=1024)
    committed = FORK.Value("i", 0)
    writer = spawn(_add_forever, root, package, committed)
    deadline = time.monotonic() + 120
    while committed.value < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.05))
    os.kill(writer.pid, signal.SIGKILL)
    _finish(writer)

    visible = catalog.query()
    assert len(visible) >= committed.value >= 2
    report = catalog.verify()
    assert report.ok and report.entries == len(visible)
    garbage = catalog.gc(grace_seconds=0)
    assert len(garbage.removed_entries) <= 1
    assert all(catalog.store.entry_ids().values()) and len(catalog.store.entry_ids()) == len(visible)


def _flip_one_byte(catalog: Catalog, path: str) -> None:
    data = bytearray(catalog.store.read_bytes(path))
    data[len(data) // 2] ^= 0x01
    catalog.store.fs.pipe_file(path, bytes(data))


def test_verify_catches_a_flipped_byte_and_a_missing_file(catalog, root, tmp_path):
    from motiondirector.commands.catalog import catalog_app

    flipped, emptied, fine = (catalog.add(make_package(tmp_path / f"p{i}", i)) for i in range(3))
    weights = f"{catalog.store.entry(flipped.id)}/{ADAPTER_WEIGHTS}"
    _flip_one_byte(catalog, weights)
    config = f"{catalog.store.entry(emptied.id)}/{ADAPTER_CONFIG}"
    catalog.store.remove_file(config)

    report = catalog.verify()
    assert (report.entries, report.files) == (3, 5)
    assert sorted((p.entry, p.kind, p.path) for p in report.problems) == sorted(
        [(flipped.id, "corrupted", weights), (emptied.id, "missing", config)])

    result = CliRunner().invoke(catalog_app, ["verify", "--catalog", root, "--json"])
    assert result.exit_code == 1
    assert {p["path"] for p in json.loads(result.stdout)["problems"]} == {weights, config}
    table = CliRunner().invoke(catalog_app, ["verify", "--catalog", root])
    assert table.exit_code == 1 and "corrupted" in table.output

    with pytest.raises(CorruptEntryError, match="differs from its recorded sha256"):
        catalog.resolve(flipped.id)
    with pytest.raises(CorruptEntryError, match="missing"):
        catalog.resolve(emptied.id)
    assert read_package(catalog.resolve(fine.id))[0].id == fine.id
    if not catalog.store.is_local:  # failed downloads leave nothing behind in the resolve cache
        assert [p.name.split("-")[0] for p in (tmp_path / "resolved").iterdir()] == [fine.id]


def test_resolve_downloads_a_remote_entry_once(request, tmp_path):
    s3 = request.getfixturevalue("s3_root")
    catalog = Catalog(s3, resolve_cache=tmp_path / "resolved")
    entry = catalog.add(make_package(tmp_path / "pkg", 4))
    folder = catalog.resolve(entry.id)
    assert folder.parent == tmp_path / "resolved" and entry.id in folder.name
    manifest, _ = read_package(folder)
    assert manifest == entry
    stamp = (folder / ADAPTER_WEIGHTS).stat().st_mtime_ns
    assert Catalog(s3, resolve_cache=tmp_path / "resolved").resolve(entry.id) == folder
    assert (folder / ADAPTER_WEIGHTS).stat().st_mtime_ns == stamp
