"""The catalog on a local path: ids, add/get/resolve, queries over index + unindexed entries, reindex,
dedupe, invalid manifests, run registration and the `motiondirector catalog` CLI.

Crash, concurrency and corruption tests on a local path and on S3 are in test_catalog_stores.py.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from motiondirector.catalog import (
    Catalog,
    InvalidIdError,
    UnknownEntryError,
    is_catalog_id,
    new_id,
    register_run,
    validate_id,
)
from motiondirector.catalog.ids import ID_LENGTH, id_time
from motiondirector.lora.package import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    BaseModelRef,
    Manifest,
    PackageError,
    read_package,
    write_package,
)
from motiondirector.storage import sha256_file
from motiondirector.train.layout import TRAINING_STATE, RunLayout

TARGETS = ["down.0.attn.to_q", "down.0.attn.to_v"]


def make_package(folder: Path, seed: int = 0, *, kind: str = "temporal", rank: int = 2, width: int = 8,
                 **fields) -> Path:
    """A tiny but complete LoRA package written by the real writer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module in TARGETS:
        state[f"{module}.lora_A.weight"] = torch.randn(rank, width, generator=generator)
        state[f"{module}.lora_B.weight"] = torch.randn(width, rank, generator=generator)
    fields.setdefault("base", BaseModelRef(model_id="tiny/model", architecture="arch-1"))
    manifest = Manifest(kind=kind, rank=rank, alpha=float(rank), targets=TARGETS, **fields)
    return write_package(folder, state, manifest)


def ids_of(manifests) -> list[str]:
    return [m.id for m in manifests]


# ---- ids -------------------------------------------------------------------------------------------


def test_ids_are_fixed_length_time_sortable_and_validated():
    early, late = new_id(now=1_700_000_000.0), new_id(now=1_700_000_000.002)
    assert len(early) == ID_LENGTH and is_catalog_id(early) and early < late
    assert id_time(early) == datetime.fromtimestamp(1_700_000_000.0, UTC)
    assert len({new_id() for _ in range(1000)}) == 1000
    assert validate_id(early) == early
    for bad in ["../" + early[3:], early[:-1], early + "0", early.lower(), early[:-1] + "/", early[:-1] + "I",
                "8" + early[1:], "", None, 42]:
        assert not is_catalog_id(bad)
        with pytest.raises(InvalidIdError, match="is not a catalog id"):
            validate_id(bad)


def test_catalog_root_comes_from_argument_then_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONDIRECTOR_CATALOG", str(tmp_path / "from-env"))
    assert Catalog().uri == str(tmp_path / "from-env")
    assert Catalog(tmp_path / "explicit").uri == str(tmp_path / "explicit")
    monkeypatch.delenv("MOTIONDIRECTOR_CATALOG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Catalog().uri == str(tmp_path / "home" / ".cache" / "motiondirector" / "catalog")
    assert Catalog("memory://somewhere").store.is_local is False


# ---- one entry -------------------------------------------------------------------------------------


def test_add_fills_catalog_fields_and_resolve_gives_the_same_package(tmp_path):
    package = make_package(tmp_path / "pkg", seed=1, concept="car turn", tags=["from-training"])
    (tmp_path / "sample.gif").write_bytes(b"GIF89a-not-really")
    catalog = Catalog(tmp_path / "catalog")
    manifest = catalog.add(package, name="turning car", tags=["car", " car ", "turn"], description="demo",
                           preview=tmp_path / "sample.gif", run_id="run-1")

    assert is_catalog_id(manifest.id)
    assert (manifest.name, manifest.description, manifest.run_id) == ("turning car", "demo", "run-1")
    assert manifest.tags == ["from-training", "car", "turn"]
    assert manifest.preview == "preview.gif"
    folder = catalog.resolve(manifest.id)
    assert folder == Path(catalog.store.entry(manifest.id))
    on_disk = {p.name for p in folder.iterdir()}
    assert on_disk == {"adapter_config.json", ADAPTER_WEIGHTS, "preview.gif", MANIFEST}
    assert manifest.sha256 == {name: sha256_file(folder / name) for name in on_disk - {MANIFEST}}
    assert catalog.get(manifest.id) == manifest

    stored, state = read_package(folder)
    _, original = read_package(package)
    assert stored.concept == "car turn" and stored.id == manifest.id
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


def test_unknown_and_invalid_ids_give_clear_errors(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    missing = new_id()
    with pytest.raises(UnknownEntryError, match=f"{missing}: no such entry") as caught:
        catalog.get(missing)
    assert isinstance(caught.value, KeyError) and str(caught.value).startswith(missing)
    with pytest.raises(UnknownEntryError):
        catalog.remove(missing)
    for bad in ["../../etc", "a/b", missing.lower()]:
        with pytest.raises(InvalidIdError):
            catalog.get(bad)
        with pytest.raises(InvalidIdError):
            catalog.resolve(bad)
    with pytest.raises(InvalidIdError):
        catalog.add(make_package(tmp_path / "pkg"), lineage=["../x"])


def test_add_refuses_an_incomplete_package(tmp_path):
    package = make_package(tmp_path / "pkg")
    (package / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(PackageError, match="missing"):
        Catalog(tmp_path / "catalog").add(package)
    assert Catalog(tmp_path / "catalog").store.entry_ids() == {}


def test_dedupe_returns_the_existing_entry_for_the_same_files(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    package, other = make_package(tmp_path / "a", seed=1), make_package(tmp_path / "b", seed=2)
    first = catalog.add(package)
    assert catalog.add(package).id != first.id  # without --dedupe: a second entry
    assert catalog.add(package, dedupe=True).id == first.id
    third = catalog.add(other, dedupe=True)
    assert third.id != first.id
    assert len(catalog.query()) == 3


def test_remove_uncommits_then_deletes(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    keep, gone = catalog.add(make_package(tmp_path / "a", 1)), catalog.add(make_package(tmp_path / "b", 2))
    catalog.reindex()
    catalog.remove(gone.id)
    assert ids_of(catalog.query()) == [keep.id]
    assert not Path(catalog.store.entry(gone.id)).exists()
    with pytest.raises(UnknownEntryError):
        catalog.get(gone.id)

    # A local removal renames the folder away in one step; if deleting it is then cut short, the
    # leftover is invisible at once and `gc` deletes it.
    entries = Path(catalog.store.entries_dir)
    (entries / keep.id).rename(entries / f".removed-{keep.id}-0000")
    assert catalog.query() == [] and catalog.query(fresh=False) != []
    assert catalog.gc(grace_seconds=3600).removed_entries == [f".removed-{keep.id}-0000"]
    assert list(entries.iterdir()) == []


# ---- queries and the index -------------------------------------------------------------------------


@pytest.fixture()
def populated(tmp_path):
    """Eight entries with known fields; returns (catalog, {label: manifest})."""
    catalog = Catalog(tmp_path / "catalog")
    now = datetime.now(UTC)
    specs = {
        "car1": dict(concept="car turn", captions=["a red car turning left"], metrics={"clip": 0.31}),
        "car2": dict(concept="Car Turn", captions=["a jeep turning"], metrics={"clip": 0.27}, step=300),
        "bike": dict(concept="cycling", captions=["a person riding a bicycle"], metrics={"clip": 0.35}),
        "golf": dict(concept="golf swing", captions=["a man swinging a club"], metrics={"motion": 0.9}),
        "app1": dict(kind="spatial", concept="car turn", captions=["a red car"], metrics={"clip": 0.40}),
        "old": dict(concept="car turn", captions=["an old car"], created_at=now - timedelta(days=30)),
        "sdxl": dict(concept="car turn", base=BaseModelRef(model_id="other/model", architecture="arch-2")),
        "desc": dict(concept="dance", description="Salsa steps in a studio"),
    }
    tags = {"car1": ["car", "best"], "car2": ["car"], "app1": ["car", "best"], "bike": ["best"]}
    entries = {}
    for seed, (label, fields) in enumerate(specs.items()):
        entries[label] = catalog.add(make_package(tmp_path / "src" / label, seed, **fields),
                                     name=f"lora-{label}", tags=tags.get(label, ()))
    return catalog, entries


def check_queries(catalog: Catalog, entries: dict[str, Manifest], fresh: bool = True) -> None:
    def labels(**options):
        by_id = {m.id: label for label, m in entries.items()}
        return [by_id[m.id] for m in catalog.query(fresh=fresh, **options)]

    by_id = sorted(entries, key=lambda label: entries[label].id)
    everything = by_id[::-1]  # default: newest id first
    assert labels() == everything
    assert labels(sort="id") == everything[::-1]
    assert sorted(labels(concept="car turn")) == sorted(["car1", "car2", "app1", "old", "sdxl"])
    assert sorted(labels(kind="spatial")) == ["app1"]
    assert labels(base="other/model") == labels(base="arch-2") == ["sdxl"]
    assert sorted(labels(tags=["car"])) == ["app1", "car1", "car2"]
    assert sorted(labels(tags=["car", "best"])) == ["app1", "car1"]
    assert labels(min_metrics={"clip": 0.3}, sort="-metrics.clip") == ["app1", "bike", "car1"]
    assert labels(min_metrics={"clip": 0.3, "motion": 0.0}) == []
    without_clip = [label for label in by_id if "clip" not in entries[label].metrics]  # last, ties by id
    assert labels(sort="metrics.clip") == ["car2", "car1", "bike", "app1", *without_clip]
    assert "old" not in labels(created_after=datetime.now(UTC) - timedelta(days=1))
    assert labels(created_before=datetime.now(UTC) - timedelta(days=1)) == ["old"]
    assert sorted(labels(text="TURNING")) == ["car1", "car2"]  # captions, case-insensitive
    assert labels(text="salsa") == ["desc"]  # description
    assert labels(text="lora-bike") == ["bike"]  # name
    assert labels(text="swing", kind="temporal") == ["golf"]  # concept and caption
    assert labels(sort="-step", limit=1) == ["car2"]
    assert labels(sort="name", limit=2) == ["app1", "bike"]
    pages = [labels(limit=3, offset=offset) for offset in (0, 3, 6)]
    assert [len(page) for page in pages] == [3, 3, 2] and sum(pages, []) == everything
    page = catalog.page(tags=["car"], limit=1, offset=1, fresh=fresh)
    assert page.total == 3 and len(page.manifests) == 1
    assert labels(limit=0) == [] and labels(offset=100) == []


def test_queries_filter_sort_and_paginate_without_an_index(populated):
    catalog, entries = populated
    assert catalog.current_index_file() is None
    check_queries(catalog, entries)


def test_queries_give_the_same_answers_from_index_and_from_a_mix(populated, tmp_path):
    catalog, entries = populated
    report = catalog.reindex()
    assert (report.rows, report.added, report.dropped, report.written) == (8, 8, 0, True)
    check_queries(catalog, entries, fresh=False)
    check_queries(Catalog(catalog.uri), entries)  # a new reader, from the index file

    # Remove one indexed entry and re-add it as an unindexed one: the merge hides the removed id
    # and shows the new one, so the answers only change by that id.
    old = entries["bike"]
    catalog.remove(old.id)
    folder = tmp_path / "src-again"
    make_package(folder, seed=99, concept="cycling", captions=["a person riding a bicycle"], metrics={"clip": 0.35})
    entries = {**entries, "bike": catalog.add(folder, name="lora-bike", tags=["best"])}
    by_id = {m.id: label for label, m in entries.items()}
    assert [by_id[m.id] for m in catalog.query()][0] == "bike"  # newest now
    assert old.id not in ids_of(catalog.query())
    stale = ids_of(catalog.query(fresh=False))  # the index alone is as of the reindex
    assert old.id in stale and entries["bike"].id not in stale
    assert sorted(ids_of(catalog.query(text="bicycle"))) == [entries["bike"].id]


def test_reindex_is_a_set_difference_and_idempotent(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    added = [catalog.add(make_package(tmp_path / f"p{i}", i)) for i in range(3)]
    first = catalog.reindex()
    assert (first.rows, first.added, first.written) == (3, 3, True)
    again = catalog.reindex()
    assert (again.index_file, again.rows, again.added, again.dropped, again.written) == (first.index_file, 3, 0, 0,
                                                                                      False)
    catalog.remove(added[0].id)
    new = catalog.add(make_package(tmp_path / "p9", 9))
    third = Catalog(catalog.uri).reindex()
    assert (third.rows, third.added, third.dropped) == (3, 1, 1) and third.index_file != first.index_file
    assert catalog.current_index_file() == third.index_file
    assert sorted(ids_of(catalog.query(fresh=False))) == sorted([added[1].id, added[2].id, new.id])
    full = catalog.reindex(full=True)
    assert full.rows == 3 and full.written
    # Superseded snapshots are garbage once older than the grace period; the current one never is.
    report = catalog.gc(grace_seconds=0)
    assert sorted(report.removed_index_files) == sorted([first.index_file, third.index_file])
    assert sorted(p.name for p in Path(catalog.store.index_dir).iterdir()) == sorted(["CURRENT.json",
                                                                                      full.index_file])
    assert len(catalog.query(fresh=False)) == 3


def test_invalid_manifests_are_reported_not_crashed_on(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    good = catalog.add(make_package(tmp_path / "good", 1))
    broken = catalog.add(make_package(tmp_path / "broken", 2))
    manifest_file = Path(catalog.store.manifest(broken.id))
    data = json.loads(manifest_file.read_text())
    del data["kind"]
    manifest_file.write_text(json.dumps(data))
    garbage = catalog.add(make_package(tmp_path / "garbage", 3))
    Path(catalog.store.manifest(garbage.id)).write_text("{not json")

    for _ in range(2):  # unindexed, then from the index
        page = catalog.page()
        assert ids_of(page.manifests) == [good.id]
        assert sorted(page.invalid) == sorted([broken.id, garbage.id])
        assert "kind" in page.invalid[broken.id] and str(manifest_file) in page.invalid[broken.id]
        catalog.reindex()
    with pytest.raises(PackageError, match="kind"):
        catalog.get(broken.id)
    problems = catalog.verify().problems
    assert sorted((p.entry, p.kind) for p in problems) == sorted([(broken.id, "invalid-manifest"),
                                                                  (garbage.id, "invalid-manifest")])
    catalog.remove(broken.id)  # an invalid entry can still be removed
    assert sorted(catalog.invalid_entries()) == [garbage.id]


def test_a_manifest_copied_into_another_folder_is_invalid(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    entry = catalog.add(make_package(tmp_path / "pkg"))
    impostor = new_id()
    Path(catalog.store.entry(impostor)).mkdir()
    Path(catalog.store.manifest(impostor)).write_bytes(Path(catalog.store.manifest(entry.id)).read_bytes())
    assert "does not match its folder" in catalog.invalid_entries()[impostor]


# ---- runs --------------------------------------------------------------------------------------------


def make_run(root: Path, *, spatial: int = 2, finished: bool = True) -> RunLayout:
    run = RunLayout(root)
    make_package(run.temporal, 0, concept="car turn", step=100)
    for k in range(spatial):
        make_package(run.spatial(k), k + 1, kind="spatial", concept="car turn", step=100)
    run.samples.mkdir(parents=True)
    (run.samples / "step-50.gif").write_bytes(b"older")
    (run.samples / "step-100.gif").write_bytes(b"newest")
    later = run.samples / "step-100.gif"
    os.utime(later, (later.stat().st_atime, later.stat().st_mtime + 10))
    if finished:
        run.summary.write_text("{}")
    return run


def test_register_run_adds_all_packages_under_one_run_id(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    run = make_run(tmp_path / "car-run")
    added = register_run(catalog, run.root, tags=["car"])
    assert [m.kind for m in added] == ["temporal", "spatial", "spatial"]
    assert [m.name for m in added] == ["car-run-temporal", "car-run-spatial-0", "car-run-spatial-1"]
    assert len({m.run_id for m in added}) == 1 and is_catalog_id(added[0].run_id)
    assert all(m.tags == ["car"] and m.preview == "preview.gif" for m in added)
    preview = Path(catalog.resolve(added[0].id)) / "preview.gif"
    assert preview.read_bytes() == b"newest"

    with pytest.raises(PackageError, match="not a finished run"):
        register_run(catalog, make_run(tmp_path / "unfinished", finished=False).root)
    ckpt = run.checkpoint(50)
    make_package(ckpt.temporal, 5)
    (ckpt.root / TRAINING_STATE).write_bytes(b"state")
    from_checkpoint = register_run(catalog, f"{run.root}@step-50")
    assert [m.name for m in from_checkpoint] == ["car-run-step-50-temporal"]
    with pytest.raises(PackageError, match="no complete checkpoint step-7"):
        register_run(catalog, f"{run.root}@step-7")


# ---- CLI ---------------------------------------------------------------------------------------------


@pytest.fixture()
def cli():
    import typer

    from motiondirector.commands.catalog import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["catalog", *map(str, args)])

    return invoke


def test_cli_add_ls_search_show_rm_reindex_gc(cli, tmp_path):
    root = str(tmp_path / "catalog")
    package = make_package(tmp_path / "pkg", 1, concept="car turn", captions=["a car turning"],
                           metrics={"clip": 0.3})
    result = cli("add", package, "--catalog", root, "--name", "car", "--tag", "car", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)[0]
    run = make_run(tmp_path / "run", spatial=1)
    result = cli("add", run.root, "--catalog", root, "--json")
    assert result.exit_code == 0, result.output
    run_entries = json.loads(result.stdout)
    assert len(run_entries) == 2 and run_entries[0]["run_id"] == run_entries[1]["run_id"]

    listing = json.loads(cli("ls", "--catalog", root, "--json").stdout)
    assert listing["total"] == 3 and listing["invalid"] == {}
    oldest_first = sorted([entry["id"], run_entries[0]["id"], run_entries[1]["id"]])
    assert [e["id"] for e in listing["entries"]] == oldest_first[::-1]
    filtered = json.loads(cli("ls", "--catalog", root, "--kind", "spatial", "--json").stdout)
    assert [e["id"] for e in filtered["entries"]] == [run_entries[1]["id"]]
    metric = json.loads(cli("ls", "--catalog", root, "--min-metric", "clip=0.25", "--json").stdout)
    assert [e["id"] for e in metric["entries"]] == [entry["id"]]
    found = json.loads(cli("search", "turning", "--catalog", root, "--json").stdout)
    assert [e["id"] for e in found["entries"]] == [entry["id"]]
    page = json.loads(cli("ls", "--catalog", root, "--sort", "id", "--limit", "1", "--offset", "1",
                          "--json").stdout)
    assert page["total"] == 3 and [e["id"] for e in page["entries"]] == [oldest_first[1]]
    shown = json.loads(cli("show", entry["id"], "--catalog", root, "--json").stdout)
    assert shown == entry

    table = cli("ls", "--catalog", root)
    assert table.exit_code == 0 and entry["id"] in table.output and "showing 1-3 of 3" in table.output
    assert entry["id"] in cli("show", entry["id"], "--catalog", root).output

    reindexed = json.loads(cli("reindex", "--catalog", root, "--json").stdout)
    assert (reindexed["rows"], reindexed["added"]) == (3, 3)
    assert json.loads(cli("ls", "--catalog", root, "--from-index", "--json").stdout)["total"] == 3
    assert cli("rm", entry["id"], "--catalog", root).exit_code == 0
    assert json.loads(cli("ls", "--catalog", root, "--json").stdout)["total"] == 2
    gc = json.loads(cli("gc", "--catalog", root, "--grace", "0", "--json").stdout)
    assert gc["removed_entries"] == [] and gc["dry_run"] is False
    assert cli("verify", "--catalog", root).exit_code == 0


@pytest.mark.parametrize("width", [80, 160])
def test_cli_ls_is_readable_at_the_terminal_width(cli, tmp_path, monkeypatch, width):
    from rich.console import Console

    monkeypatch.setattr("motiondirector.commands.catalog.console", Console(stderr=True, width=width))
    catalog = Catalog(tmp_path / "catalog")
    long_base = BaseModelRef(model_id="/home/someone/models/zeroscope_v2_576w-finetuned-on-cars", architecture="a")
    car = catalog.add(make_package(tmp_path / "p1", 1, base=long_base, concept="car turning left",
                                   metrics={"clip": 0.3125}), name="car-turn", tags=["car", "turn"])
    toy = catalog.add(make_package(tmp_path / "p2", 2, kind="spatial", base=BaseModelRef(model_id="toy",
                                                                                         architecture="a")))
    result = cli("ls", "--catalog", catalog.uri)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= width
    header = next(line for line in lines if line.startswith("id "))
    assert header.split()[:5] == ["id", "name", "kind", "concept", "base"]  # never squeezed to 2 characters
    car_row = next(line for line in lines if line.startswith(car.id))
    assert car_row.split()[1:3] == ["car-turn", "temporal"] and "zeroscope_v2" in car_row
    assert "/home/someone" not in result.output  # a local base shows as its folder name
    assert next(line for line in lines if line.startswith(toy.id)).split()[1:4] == ["p2", "spatial", "toy"]
    if width == 80:
        assert "not shown at this width: created, rank, step, tags, metrics" in result.output
    else:
        assert header.split()[5:] == ["created", "rank", "step", "tags", "metrics"]
        assert "car, turn" in car_row and "clip=0.312" in car_row


def test_cli_errors_name_the_problem_and_exit_2(cli, tmp_path):
    root = str(tmp_path / "catalog")
    unknown = new_id()
    for command in (("show", unknown), ("rm", unknown)):
        result = cli(*command, "--catalog", root)
        assert result.exit_code == 2 and f"{unknown}: no such entry" in result.output
    result = cli("show", "../../etc/passwd", "--catalog", root)
    assert result.exit_code == 2 and "is not a catalog id" in result.output
    result = cli("ls", "--catalog", root, "--min-metric", "clip")
    assert result.exit_code == 2 and "NAME=VALUE" in result.output
    result = cli("ls", "--catalog", root, "--sort", "colour")
    assert result.exit_code == 2 and "sort key 'colour'" in result.output
    result = cli("ls", "--catalog", root, "--since", "yesterday")
    assert result.exit_code == 2 and "--since 'yesterday'" in result.output
    result = cli("add", tmp_path / "nothing-here", "--catalog", root)
    assert result.exit_code == 2 and "nothing-here" in result.output


def test_cli_ls_lists_invalid_entries_and_verify_fails_on_them(cli, tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    entry = catalog.add(make_package(tmp_path / "pkg"))
    Path(catalog.store.manifest(entry.id)).write_text('{"kind": "sideways"}')
    result = cli("ls", "--catalog", catalog.uri)
    assert result.exit_code == 0 and "invalid entry" in result.output and entry.id in result.output
    result = cli("verify", "--catalog", catalog.uri, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["problems"][0]["kind"] == "invalid-manifest"


def test_the_cli_registers_the_catalog_commands():
    from motiondirector.cli import app

    result = CliRunner().invoke(app, ["catalog", "--help"])
    assert result.exit_code == 0 and "reindex" in result.output


def test_any_fsspec_store_works_the_same_way_memory(tmp_path):
    import uuid

    catalog = Catalog(f"memory://catalog-{uuid.uuid4().hex}", resolve_cache=tmp_path / "resolved")
    first = catalog.add(make_package(tmp_path / "a", 1), tags=["x"])
    second = catalog.add(make_package(tmp_path / "b", 2, concept="bike"))
    assert catalog.reindex().rows == 2
    assert ids_of(catalog.query(text="bike")) == [second.id] and ids_of(catalog.query(tags=["x"])) == [first.id]
    folder = catalog.resolve(first.id)
    assert folder.is_relative_to(tmp_path / "resolved") and read_package(folder)[0] == first
    catalog.remove(second.id)
    assert ids_of(catalog.query()) == [first.id] and catalog.verify().ok
    orphan = new_id()
    catalog.store.write_atomic(f"{catalog.store.entry(orphan)}/{ADAPTER_WEIGHTS}", b"partial")
    assert catalog.gc(grace_seconds=0).removed_entries == [orphan]
    assert catalog.store.entry_ids() == {first.id: True}
