"""The local record cache: reuse by fingerprint, atomic files, cache root, and `motiondirector cache`."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_data_video import write_video  # pytest puts tests/ on sys.path
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.data import DataError, DatasetSpec, cache_root, list_cache, load_records
from motiondirector.events import Progress, Recorder


@pytest.fixture()
def counted(tiny_backbone):
    """The tiny backbone with its encoders counting the clips and prompts they encode."""
    calls = Counter()
    encode_video, encode_text = tiny_backbone.encode_video, tiny_backbone.encode_text

    def count_video(frames):
        calls["clips"] += frames.shape[0]
        return encode_video(frames)

    def count_text(prompts):
        calls["prompts"] += len(prompts)
        return encode_text(prompts)

    tiny_backbone.encode_video, tiny_backbone.encode_text = count_video, count_text
    return tiny_backbone, calls


@pytest.fixture()
def two_videos(tmp_path, car_turn):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(car_turn, folder / "b.mp4")
    (folder / "a.mp4").write_bytes(car_turn.read_bytes()[:-1] + b"\0")  # other bytes, other content hash
    return folder


def _spec(folder, **overrides) -> DatasetSpec:
    return DatasetSpec(**{"sources": [str(folder)], "caption": "a car", "frames": 4, "size": (32, 32),
                          "mode": "sliding", "stride": 6, **overrides})


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_second_load_encodes_nothing(counted, two_videos, tmp_path):
    backbone, calls = counted
    cache = tmp_path / "cache"
    first = load_records(_spec(two_videos), backbone, cache_dir=cache)
    assert [(r.video_index, r.clip_index) for r in first] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert first[0].video_path.endswith("a.mp4") and calls == Counter(clips=6, prompts=1)
    files = _files(cache)
    assert len(files) == 6 and all(f.startswith("records/videos/") and f.endswith(".parquet") for f in files)

    calls.clear()
    second = load_records(_spec(two_videos), backbone, cache_dir=cache)
    assert calls == Counter() and _files(cache) == files
    for a, b in zip(first, second, strict=True):
        assert (a.latent_fingerprint, a.text_fingerprint, a.frame_indices) == \
            (b.latent_fingerprint, b.text_fingerprint, b.frame_indices)
        np.testing.assert_array_equal(a.latent_mean, b.latent_mean)
        np.testing.assert_array_equal(a.text_embedding, b.text_embedding)


def test_changes_re_encode_only_what_they_affect(counted, two_videos, tmp_path):
    backbone, calls = counted
    cache = tmp_path / "cache"
    original = load_records(_spec(two_videos), backbone, cache_dir=cache)

    calls.clear()
    recaptioned = load_records(_spec(two_videos, caption="a red car"), backbone, cache_dir=cache)
    assert calls == Counter(prompts=1)  # text only
    np.testing.assert_array_equal(recaptioned[0].latent_mean, original[0].latent_mean)
    assert recaptioned[0].text_fingerprint != original[0].text_fingerprint

    calls.clear()
    resized = load_records(_spec(two_videos, size=(32, 48)), backbone, cache_dir=cache)
    assert calls == Counter(clips=6)  # latents only
    assert resized[0].latent_mean.shape == (4, 4, 16, 24)
    np.testing.assert_array_equal(resized[0].text_embedding, original[0].text_embedding)

    calls.clear()
    (two_videos / "b.txt").write_text("a car turning")  # one video's caption: only that text
    load_records(_spec(two_videos), backbone, cache_dir=cache)
    assert calls == Counter(prompts=1)

    calls.clear()
    renamed = load_records(_spec(two_videos, name="other"), backbone, cache_dir=cache)
    assert calls == Counter() and {r.dataset for r in renamed} == {"other"}  # reused across datasets
    assert len(list((cache / "records" / "other").glob("*.parquet"))) == 6


def test_bad_files_are_named_and_nothing_partial_is_left(counted, two_videos, tmp_path):
    backbone, calls = counted
    cache = tmp_path / "cache"
    (two_videos / "c.mp4").write_text("not a video")
    with pytest.raises(DataError, match=r"c\.mp4: not a video"):
        load_records(_spec(two_videos), backbone, cache_dir=cache)
    assert calls == Counter()  # headers are checked before anything is encoded

    # a truncated file whose header survives fails only when decoded: the earlier files' records are complete
    write_video(two_videos / "c.mp4", 40, size=64, options={"movflags": "faststart"}, noise=True)
    data = (two_videos / "c.mp4").read_bytes()
    (two_videos / "c.mp4").write_bytes(data[:len(data) // 3])
    with pytest.raises(DataError, match=r"c\.mp4: truncated or corrupt video"):
        load_records(_spec(two_videos), backbone, cache_dir=cache)
    files = _files(cache)
    assert len(files) == 6 and all(f.endswith(".parquet") for f in files)  # no temp names left behind
    (two_videos / "c.mp4").unlink()
    calls.clear()
    assert len(load_records(_spec(two_videos), backbone, cache_dir=cache)) == 6
    assert calls == Counter()


def test_images_with_progress(counted, reference_dir, tmp_path):
    backbone, calls = counted
    spec = DatasetSpec(name="warrior", sources=[str(reference_dir / "Terracotta_Warrior" / "00[12].jpg")],
                       caption="a warrior", frames=2, size=(32, 32), hflip=0.5)
    recorder = Recorder()
    records = load_records(spec, backbone, cache_dir=tmp_path, observers=[recorder])
    # Progress events, not a bar: the two files read, then the four clips (each image and its flip) encoded.
    assert [(e.phase, e.done, e.total, e.label) for e in recorder.of(Progress)] == [
        ("cache", 0, 2, "warrior: reading sources"), ("cache", 1, 2, "warrior: reading sources"),
        ("cache", 2, 2, "warrior: reading sources"),
        *[("cache", done, 4, "warrior: encoding clips") for done in range(5)]]
    assert [(r.video_index, r.clip_index, r.extra["hflip"], r.is_image) for r in records] == [
        (0, 0, False, True), (0, 1, True, True), (1, 0, False, True), (1, 1, True, True)]
    assert calls == Counter(clips=4, prompts=1) and records[0].source_fps == 0.0


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MOTIONDIRECTOR_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "motiondirector"
    monkeypatch.setenv("MOTIONDIRECTOR_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_cache_cli(counted, two_videos, tmp_path, monkeypatch):
    backbone, _ = counted
    cache = tmp_path / "cache"
    load_records(_spec(two_videos), backbone, cache_dir=cache)
    load_records(_spec(two_videos, name="second", mode="start"), backbone, cache_dir=cache)
    runner = CliRunner()

    result = runner.invoke(app, ["cache", "ls", "--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [(d["dataset"], d["videos"], d["clips"], len(d["text_fingerprints"])) for d in listing["datasets"]] == [
        ("second", 2, 2, 1), ("videos", 2, 6, 1)]
    assert listing["datasets"][1]["bytes"] == sum(p.stat().st_size for p in (cache / "records/videos").iterdir())

    monkeypatch.setenv("COLUMNS", "200")
    table = runner.invoke(app, ["cache", "ls"], env={"MOTIONDIRECTOR_CACHE": str(cache)})
    assert table.exit_code == 0 and "videos" in table.output and "KiB" in table.output

    refused = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache)], input="n\n")
    assert refused.exit_code == 1 and len(list_cache(cache)) == 2
    one = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--dataset", "second", "--yes", "--json"])
    assert json.loads(one.stdout)["removed_records"] == 2 and [s.dataset for s in list_cache(cache)] == ["videos"]
    everything = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache), "--yes"])
    assert everything.exit_code == 0 and list_cache(cache) == []
    empty = runner.invoke(app, ["cache", "ls", "--cache-dir", str(cache)])
    assert empty.exit_code == 0 and "empty" in empty.output
