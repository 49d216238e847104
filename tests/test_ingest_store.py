"""Ingest output without Ray: the spec, the commit protocol, skip decisions, text-only re-encoding, prune."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from s3_server import s3_endpoint, s3_root  # noqa: F401 - fixtures

from motiondirector.data.encode import decode_item, encode_clips
from motiondirector.data.ingest_plan import RowIndex, build_records, decode_works, plan_works
from motiondirector.data.ingest_read import prune, read_ingested
from motiondirector.data.ingest_spec import load_ingest_spec
from motiondirector.data.ingest_store import COMMITS, DatasetState, IngestStore, new_run_id, write_records
from motiondirector.data.reference import DatasetReference, parse_dataset_reference
from motiondirector.data.sources import DatasetSpec, list_items
from motiondirector.video_io import write_video

REPO = Path(__file__).resolve().parents[1]


def _videos(folder: Path, count: int, frames: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        write_video(rng.integers(0, 256, (frames, 40, 48, 3), dtype=np.uint8), folder / f"clip{index}.mp4", fps=8)
    return folder


def _ingest_in_process(store: IngestStore, spec: DatasetSpec, backbone) -> tuple[str | None, dict[str, int]]:
    """One run through the same library stages the Ray plan distributes; returns (commit, work counts)."""
    spec = spec.with_model_defaults(backbone.defaults)  # as run_ingest does (IngestSpec.with_model_defaults)
    index = RowIndex.committed(store.state())
    works = [work for item in list_items(spec)
             for work in decode_works(plan_works(item, spec, index, backbone.vae_id, backbone.text_encoder_id))]
    records = build_records(backbone, works, store.fs, batch_size=2)
    run_id = new_run_id()
    files = [write_records(store, store.run_folder(run_id, temporary=True), spec.name, records)] if records else []
    state = DatasetState(base="tiny", vae_id=backbone.vae_id, text_encoder_id=backbone.text_encoder_id,
                         spec=spec.model_dump(mode="json"), clips=[work.live for work in works])
    counts = {"keep": sum(w.action == "keep" for w in works), "vae": sum(w.needs_pixels for w in works),
              "reused_latents": sum(w.latent_source is not None for w in works)}
    return store.commit_run(run_id, files, [], {spec.name: state}), counts


def _data_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_reference_spec_resolves_against_its_folder(tmp_path):
    spec = load_ingest_spec(REPO / "configs" / "ingest_reference.yaml", base="toy", output=str(tmp_path))
    names = [d.name for d in spec.datasets]
    assert len(names) >= 3 and {"bicycle", "car-turn", "terracotta-warrior"} <= set(names)
    assert spec.base == "toy" and spec.output == str(tmp_path)
    counts = {d.name: len(list_items(d)) for d in spec.datasets}
    assert counts["bicycle"] == 4 and counts["car-turn"] == 1 and counts["terracotta-warrior"] == 8
    default_output = load_ingest_spec(REPO / "configs" / "ingest_reference.yaml").output
    assert default_output == str(REPO / "out" / "ingest-reference")


@pytest.mark.parametrize(("text", "expected"), [
    ("datasets: [{sources: a.mp4, frame: 4}]\nbase: toy\n", "datasets.0.frame: unknown key (did you mean datasets.0.frames?)"),
    ("datasets: [{sources: a.mp4}]\n", "no base model for a"),
    ("base: toy\ndatasets: [{sources: a.mp4}, {sources: b/a.mp4}]\n", "dataset names must be unique, repeated: a"),
    ("base: toy\ndatasets: [{name: 'a b', sources: a.mp4}]\n", "must be letters, digits"),
    ("base: toy\ndatasets: []\n", "datasets: List should have at least 1 item"),
    ("- just a list\n", "expected a mapping"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="spec.yaml") as error:
        load_ingest_spec(path)
    assert expected in str(error.value)


def test_dataset_reference():
    assert parse_dataset_reference("s3://bucket/cache#bicycle") == ("s3://bucket/cache", "bicycle")
    assert parse_dataset_reference("/data/a#b#car-turn") == ("/data/a#b", "car-turn")
    for bad in ("/data/cache", "#bicycle", "/data/cache#"):
        with pytest.raises(ValueError, match="expected '<ingest output URI>#<dataset name>'"):
            parse_dataset_reference(bad)


def test_commits_incremental_text_only_and_prune(tmp_path, tiny_backbone, monkeypatch):
    videos = _videos(tmp_path / "videos", 3)
    spec = DatasetSpec(name="gen", sources=[str(videos)], caption="a box moves", frames=4, fps=8.0, size=(32, 32))
    store = IngestStore(str(tmp_path / "out"))

    first, counts = _ingest_in_process(store, spec, tiny_backbone)
    assert first and counts == {"keep": 0, "vae": 3, "reused_latents": 0}
    expected = encode_clips(tiny_backbone, [c for item in list_items(spec) for c in decode_item(item, spec)])
    records = read_ingested(store.uri, "gen")
    assert [(r.video_index, r.latent_fingerprint, r.text_fingerprint) for r in records] == \
        [(r.video_index, r.latent_fingerprint, r.text_fingerprint) for r in expected]
    for got, want in zip(records, expected, strict=True):
        np.testing.assert_array_equal(got.latent_mean, want.latent_mean)
        np.testing.assert_array_equal(got.text_embedding, want.text_embedding)

    # Same spec again: everything is committed, nothing is written.
    before = _data_files(tmp_path / "out")
    again, counts = _ingest_in_process(store, spec, tiny_backbone)
    assert again is None and counts == {"keep": 3, "vae": 0, "reused_latents": 0}
    assert _data_files(tmp_path / "out") == before

    # A new caption re-encodes only the text: latents come from the committed rows, the VAE never runs.
    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE ran for a caption change")

    monkeypatch.setattr(tiny_backbone, "encode_video", no_vae)
    recaptioned = spec.model_copy(update={"caption": "a box slides"})
    second, counts = _ingest_in_process(store, recaptioned, tiny_backbone)
    assert second and counts == {"keep": 0, "vae": 0, "reused_latents": 3}
    updated = read_ingested(store.uri, "gen")
    assert {r.caption for r in updated} == {"a box slides"}
    for old, new in zip(records, updated, strict=True):
        assert new.latent_fingerprint == old.latent_fingerprint and new.text_fingerprint != old.text_fingerprint
        np.testing.assert_array_equal(new.latent_mean, old.latent_mean)
        assert not np.array_equal(new.text_embedding, old.text_embedding)

    # Superseded rows stay in the files until prune; a crashed run's folders are never read.
    (tmp_path / "out" / "runs" / "crashed.tmp").mkdir()
    (tmp_path / "out" / "runs" / "crashed.tmp" / "part.parquet").write_bytes(b"half a file")
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out" / "runs").rglob("*.parquet")
               if "crashed" not in str(p))
    assert rows == 6
    pruned = prune(store.uri)
    assert store.commit_names() == [pruned]
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == [store.commits()[0][1].run_id]
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").rglob("*.parquet")) == 3
    after = read_ingested(store.uri, "gen")
    for got, want in zip(after, updated, strict=True):
        assert (got.video_path, got.text_fingerprint) == (want.video_path, want.text_fingerprint)
        np.testing.assert_array_equal(got.latent_std, want.latent_std)


def test_positions_follow_the_dataset_and_uncommitted_files_are_invisible(tmp_path, tiny_backbone):
    videos = _videos(tmp_path / "videos", 2)
    spec = DatasetSpec(name="gen", sources=[str(videos)], caption="a box moves", frames=4, fps=8.0, size=(32, 32))
    store = IngestStore(str(tmp_path / "out"))
    _ingest_in_process(store, spec, tiny_backbone)
    # A copy of clip1 sorts first: it shares clip1's committed row (same bytes and caption), and the
    # existing clips move to video_index 1 and 2: a commit with new positions and no new rows.
    (videos / "a-first.mp4").write_bytes((videos / "clip1.mp4").read_bytes())
    commit, counts = _ingest_in_process(store, spec, tiny_backbone)
    assert commit and counts == {"keep": 3, "vae": 0, "reused_latents": 0}
    assert store.commits()[-1][1].records == []
    records = read_ingested(store.uri, "gen")
    assert [(Path(r.video_path).name, r.video_index) for r in records] == \
        [("a-first.mp4", 0), ("clip0.mp4", 1), ("clip1.mp4", 2)]
    # Without a commit manifest, a finished-looking run folder is not part of the output.
    (tmp_path / "out" / COMMITS / sorted(store.commit_names())[-1]).unlink()
    assert [Path(r.video_path).name for r in read_ingested(store.uri, "gen")] == ["clip0.mp4", "clip1.mp4"]
    with pytest.raises(ValueError, match="no committed dataset 'other' \\(committed: gen\\)"):
        read_ingested(store.uri, "other")
    with pytest.raises(ValueError, match="was encoded by .*/vae@.* but the training model's VAE is other-vae"):
        read_ingested(store.uri, "gen", vae_id="other-vae")


def test_memory_filesystem_commits(tiny_backbone, tmp_path):
    videos = _videos(tmp_path / "videos", 1)
    spec = DatasetSpec(name="gen", sources=[str(videos)], caption="a box moves", frames=4, fps=8.0, size=(32, 32))
    store = IngestStore(f"memory://ingest-{new_run_id()}")
    commit, _ = _ingest_in_process(store, spec, tiny_backbone)
    assert store.commit_names() == [commit]
    assert len(read_ingested(store.uri, "gen")) == 1


def test_training_config_takes_a_dataset_reference():
    from motiondirector.config import ConfigError, validate_config

    config = validate_config({"base": "x", "data": {"dataset": "s3://b/cache#bicycle", "concept": "riding"}}, "c")
    assert config.data == DatasetReference(dataset="s3://b/cache#bicycle", concept="riding")
    assert validate_config(yaml.safe_load(config.to_yaml()), "again").data == config.data  # run folders re-read it
    with pytest.raises(ConfigError, match=r"data\.dataset: Value error, dataset reference 'cache': expected"):
        validate_config({"base": "x", "data": {"dataset": "cache"}}, "c")
    with pytest.raises(ConfigError, match=r"data\.frames: unknown key"):
        validate_config({"base": "x", "data": {"dataset": "/c#bicycle", "frames": 4}}, "c")


def test_cli_rejects_bad_specs_before_starting_ray(tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from motiondirector.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text("base: toy\ndatasets: [{sources: a.mp4, fsp: 8}]\n")
    result = CliRunner().invoke(app, ["ingest", str(spec), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "datasets.0.fsp: unknown key (did you mean datasets.0.fps?)" in result.output
    spec.write_text("base: toy\ndatasets: [{sources: a.mp4}]\n")
    result = CliRunner().invoke(app, ["ingest", str(spec)])
    assert result.exit_code == 2 and "no `output` in the spec; pass --output URI" in result.output
    # The library and the CLI import Ray only when an ingest actually runs.
    code = ("import sys, motiondirector.cli, motiondirector.data.ingest_spec, motiondirector.config; "
            "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_newer_commit_schema_is_refused(tmp_path):
    commits = tmp_path / COMMITS
    commits.mkdir()
    (commits / "2099-x.json").write_text('{"schema_version": 99, "run_id": "x", "committed_at": "2099-01-01T00:00:00Z"}')
    with pytest.raises(ValueError, match=r"2099-x\.json: schema_version: .*newer than this reader's \(1\)"):
        read_ingested(str(tmp_path), "gen")


def test_publish_run_on_s3_moves_files_written_by_other_processes(s3_root):  # noqa: F811 - fixture
    """A recursive fs.mv on S3 also copies the listing's pseudo-directories and fails with NoSuchKey; the
    store copies the files of runs/<id>.tmp written by others (here: another s3fs instance) and deletes them."""
    import fsspec

    store = IngestStore(s3_root)
    run_id = new_run_id()
    temp, final = store.path(store.run_folder(run_id, temporary=True)), store.path(store.run_folder(run_id))
    assert not store.fs.exists(temp)  # this process's listing cache now says: nothing there
    writer = fsspec.filesystem("s3", skip_instance_cache=True)
    for name in ("records/boxes/part-0.parquet", "records/stripes/part-0.parquet", "rejects/part-0.parquet"):
        writer.pipe_file(f"{temp}/{name}", name.encode())
    store.publish_run(run_id)
    writer.invalidate_cache()
    assert sorted(p.removeprefix(final + "/") for p in writer.find(final)) == [
        "records/boxes/part-0.parquet", "records/stripes/part-0.parquet", "rejects/part-0.parquet"]
    assert writer.cat_file(f"{final}/records/stripes/part-0.parquet") == b"records/stripes/part-0.parquet"
    assert writer.find(temp) == []
