"""Dataset spec validation, file listing and caption sources."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest
from pydantic import ValidationError

from motiondirector.backbones.defaults import ModelDefaults
from motiondirector.data import DataError, DatasetSpec, list_items


@pytest.fixture()
def video_folder(tmp_path, car_turn):
    """Three copies of car-turn with different names, b.mp4 with a sidecar caption, plus noise files."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("c.mp4", "a.mp4", "b.mp4"):
        shutil.copy(car_turn, folder / name)
    (folder / "b.txt").write_text("  a red car turns left \n")
    (folder / "readme.md").write_text("not data")
    return folder


def test_spec_defaults_and_unknown_keys():
    spec = DatasetSpec(sources="data/bicycle/", caption="A person is riding a bicycle.")
    assert (spec.name, spec.sources, spec.frames, spec.fps, spec.size, spec.mode, spec.crop) == (
        "bicycle", ["data/bicycle/"], None, None, None, "start", "center")
    # Geometry left unset is the encoding model's; values that are set stay.
    toy = ModelDefaults(frames=8, height=32, width=48, fps=4.0, steps=20, guidance=6.0)
    resolved = spec.with_model_defaults(toy)
    assert (resolved.frames, resolved.fps, resolved.size, resolved.clip_policy.frames) == (8, 4.0, (32, 48), 8)
    assert DatasetSpec(sources="x", frames=3).with_model_defaults(toy).frames == 3
    with pytest.raises(ValueError, match="apply the base model's defaults"):
        _ = spec.clip_policy
    assert DatasetSpec(sources=["imgs/*.jpg"]).name == "imgs"
    assert DatasetSpec(sources=["s3://bucket/car-turn.mp4"], buckets=[(320, 576)]).crop == "bucket"
    with pytest.raises(ValidationError, match="captoin"):
        DatasetSpec(sources=["x"], captoin="typo")
    with pytest.raises(ValidationError, match="hflip"):
        DatasetSpec(sources=["x"], hflip=1.5)
    with pytest.raises(ValidationError, match="needs `caption`"):
        DatasetSpec(sources=["x"], caption_source="fixed")
    assert DatasetSpec(sources=["x"], size=256).size == (256, 256)
    with pytest.raises(ValidationError, match="size"):
        DatasetSpec(sources=["x"], size=(0, 32))


def test_folder_items_sorted_with_sidecar_and_fallback(video_folder):
    items = list_items(DatasetSpec(sources=[str(video_folder)], caption="a car"))
    assert [(i.path.rsplit("/", 1)[1], i.video_index, i.caption, i.kind) for i in items] == [
        ("a.mp4", 0, "a car", "video"), ("b.mp4", 1, "a red car turns left", "video"), ("c.mp4", 2, "a car", "video")]


def test_metadata_jsonl_captions(video_folder):
    lines = [{"file_name": "a.mp4", "text": "meta a"}, {"file_name": "b.mp4", "text": "meta b"}]
    (video_folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    auto = list_items(DatasetSpec(sources=[str(video_folder)], caption="fallback"))
    assert [i.caption for i in auto] == ["meta a", "a red car turns left", "fallback"]  # sidecar wins over metadata
    fixed = list_items(DatasetSpec(sources=[str(video_folder)], caption="one", caption_source="fixed"))
    assert [i.caption for i in fixed] == ["one"] * 3
    with pytest.raises(DataError, match=r"c\.mp4: no caption: metadata.jsonl in its folder has no entry"):
        list_items(DatasetSpec(sources=[str(video_folder)], caption_source="metadata"))
    (video_folder / "metadata.jsonl").write_text('{"file_name": "a.mp4"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl: line 1: expected"):
        list_items(DatasetSpec(sources=[str(video_folder)], caption="x"))


def test_missing_captions_are_errors(video_folder):
    with pytest.raises(DataError, match=r"a\.mp4: no caption: no sidecar .txt, no metadata.jsonl entry"):
        list_items(DatasetSpec(sources=[str(video_folder)]))
    with pytest.raises(DataError, match=r"a\.mp4: no caption: expected a sidecar a.txt"):
        list_items(DatasetSpec(sources=[str(video_folder)], caption="x", caption_source="sidecar"))
    (video_folder / "b.txt").write_text("\n")
    with pytest.raises(DataError, match=r"b\.txt: empty caption file"):
        list_items(DatasetSpec(sources=[str(video_folder)], caption="x"))


def test_files_globs_and_mixed_kinds(video_folder, reference_dir):
    single = list_items(DatasetSpec(sources=str(video_folder / "c.mp4"), caption="x"))
    assert [(i.path, i.video_index) for i in single] == [(str(video_folder / "c.mp4"), 0)]
    globbed = list_items(DatasetSpec(sources=[str(video_folder / "[ab].mp4"), str(video_folder / "a.mp4")],
                                     caption="x"))
    assert [i.path.rsplit("/", 1)[1] for i in globbed] == ["a.mp4", "b.mp4"]  # duplicates collapse
    images = list_items(DatasetSpec(sources=str(reference_dir / "Terracotta_Warrior"), caption="x"))
    assert [i.path.rsplit("/", 1)[1] for i in images] == [f"00{k}.jpg" for k in range(1, 9)]
    assert {i.kind for i in images} == {"image"}
    shutil.copy(reference_dir / "img_car" / "car.jpg", video_folder / "car.jpg")
    with pytest.raises(DataError, match="mixes videos and images"):
        list_items(DatasetSpec(sources=[str(video_folder)], caption="x"))
    assert len(list_items(DatasetSpec(sources=[str(video_folder)], caption="x", kind="image"))) == 1


def test_bad_sources(tmp_path, video_folder):
    with pytest.raises(DataError, match=r"nope: no such file or folder"):
        list_items(DatasetSpec(sources=[str(tmp_path / "nope")], caption="x"))
    with pytest.raises(DataError, match=r"readme.md: unsupported file type '.md'"):
        list_items(DatasetSpec(sources=[str(video_folder / "readme.md")], caption="x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no video or image files found"):
        list_items(DatasetSpec(sources=[str(tmp_path / "empty")], caption="x"))


def test_remote_folder_with_metadata(car_turn):
    memory = fsspec.filesystem("memory")
    memory.pipe("/ds/x.mp4", car_turn.read_bytes())
    memory.pipe("/ds/metadata.jsonl", b'{"file_name": "x.mp4", "text": "remote caption"}\n')
    (item,) = list_items(DatasetSpec(sources="memory:///ds"))
    assert (item.path, item.caption, DatasetSpec(sources="memory:///ds").name) == (
        "memory:///ds/x.mp4", "remote caption", "ds")
    memory.rm("/ds", recursive=True)
