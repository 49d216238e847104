"""The storage floor: locations, roots, atomic writes and publishes, staged folders, file hashes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import fsspec
import pytest

from motiondirector import storage


def test_urls_stay_as_given_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("s3://bucket/a/../b/") == "s3://bucket/a/../b/"
    assert storage.normalize("memory://x") == "memory://x"
    assert storage.normalize("~/m") == str(tmp_path / "home" / "m")
    assert storage.normalize("m/") == str(tmp_path / "m")
    assert storage.normalize("./a/../m") == str(tmp_path / "m")
    assert storage.normalize("videos", relative_to=tmp_path / "cfg") == str(tmp_path / "cfg" / "videos")
    assert storage.normalize("~/v", relative_to=tmp_path / "cfg") == str(tmp_path / "home" / "v")
    assert storage.normalize("/abs/x", relative_to=tmp_path / "cfg") == "/abs/x"
    assert storage.is_url("gs://b/k") and not storage.is_url("owner/name") and not storage.is_url("C_drive:x")
    assert storage.is_local("file:///tmp/x") and storage.is_local("rel") and not storage.is_local("s3://b")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(ValueError, match="s3://b/k: a local path is needed"):
        storage.local_path("s3://b/k")


def test_roots_come_from_argument_then_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(storage.CACHE_ENV, raising=False)
    monkeypatch.delenv(storage.CATALOG_ENV, raising=False)
    assert storage.cache_root() == tmp_path / "home" / ".cache" / "motiondirector"
    assert storage.catalog_root() == str(tmp_path / "home" / ".cache" / "motiondirector" / "catalog")
    monkeypatch.setenv(storage.CACHE_ENV, "~/c")
    monkeypatch.setenv(storage.CATALOG_ENV, "s3://bucket/loras")
    assert storage.cache_root() == tmp_path / "home" / "c"
    assert storage.catalog_root() == "s3://bucket/loras"
    assert storage.cache_root(tmp_path / "x") == tmp_path / "x"
    assert storage.catalog_root("~/cat") == str(tmp_path / "home" / "cat")


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    storage.atomic_write(target, b"old")
    assert target.read_bytes() == b"old"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by other users, unlike mkstemp's 0600
    with pytest.raises(RuntimeError), storage.atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    storage.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temp files left
    with pytest.raises(FileNotFoundError):
        storage.atomic_write(tmp_path / "missing" / "b", b"x")


def test_publish_on_local_disk_and_object_store(tmp_path):
    storage.publish(str(tmp_path / "deep" / "c.json"), b"local")
    assert (tmp_path / "deep" / "c.json").read_bytes() == b"local"
    storage.publish("memory://bucket/p/c.json", b"remote")
    fs = fsspec.filesystem("memory")
    assert fs.cat_file("/bucket/p/c.json") == b"remote"
    storage.publish("/bucket/p/c.json", b"again", fs)
    assert fs.cat_file("/bucket/p/c.json") == b"again"


def test_staged_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "model"
    with pytest.raises(RuntimeError), storage.staged_folder(target) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("crash")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    with storage.staged_folder(target) as staging:
        assert staging.parent == target.parent and not target.exists()
        (staging / "weights").write_text("1")
    assert (target / "weights").read_text() == "1"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    # A concurrent writer won: its folder stays, ours is dropped.
    with storage.staged_folder(target) as staging:
        (staging / "weights").write_text("2")
    assert (target / "weights").read_text() == "1"
    # replace=True swaps the new folder in.
    with storage.staged_folder(target, replace=True) as staging:
        (staging / "weights").write_text("3")
    assert (target / "weights").read_text() == "3"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    # An empty folder (e.g. created for --out) is replaced.
    empty = tmp_path / "empty"
    empty.mkdir()
    with storage.staged_folder(empty) as staging:
        (staging / "f").write_text("x")
    assert (empty / "f").is_file()


def test_sha256_file_reads_in_chunks_on_any_filesystem(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "blob").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert storage.sha256_file(tmp_path / "blob") == expected
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/h/blob", data)
    assert storage.sha256_file("memory://h/blob") == expected
    assert storage.sha256_file("/h/blob", fs) == expected


def test_model_id_is_the_same_however_the_folder_is_spelled(tiny_model_dir, tmp_path, monkeypatch):
    from motiondirector.backbones import load_backbone, model_id

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    (home / "m").symlink_to(tiny_model_dir)
    real = str(Path(tiny_model_dir).resolve())
    spellings = ["~/m", "m", "./m/", str(home / "m"), real]
    assert {model_id(s) for s in spellings} == {real}
    assert model_id("toy") == "toy" and model_id("owner/name") == "owner/name"
    tilde, absolute = load_backbone("~/m", "cpu"), load_backbone(real, "cpu")
    assert tilde.model_id == absolute.model_id == real
    assert tilde.vae_id == absolute.vae_id and tilde.text_encoder_id == absolute.text_encoder_id


def test_config_and_ingest_spec_paths_expand_home_and_resolve_against_their_file(tmp_path, monkeypatch):
    from motiondirector.config import load_config
    from motiondirector.data.ingest_spec import load_ingest_spec

    home, folder = tmp_path / "home", tmp_path / "cfg"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (folder / "train.yaml").write_text("base: toy\ndata: {sources: ['~/videos', 'clips/', 's3://b/v.mp4']}\n")
    sources = load_config(folder / "train.yaml").data.sources
    assert sources == [str(home / "videos"), str(folder / "clips"), "s3://b/v.mp4"]
    (folder / "ingest.yaml").write_text("base: toy\noutput: ~/out\ndatasets: [{name: a, sources: ['~/v', 'w']}]\n")
    spec = load_ingest_spec(folder / "ingest.yaml")
    assert spec.output == str(home / "out")
    assert spec.datasets[0].sources == [str(home / "v"), str(folder / "w")]
