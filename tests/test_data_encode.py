"""The pure stages (decode_item, encode_clips), fingerprints, and the Parquet record format."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from motiondirector.data import (
    RECORD_SCHEMA,
    DataError,
    DatasetSpec,
    DecodedClip,
    decode_item,
    encode_clips,
    latent_fingerprint,
    list_items,
    plan_item,
    records_to_table,
    table_to_records,
    text_fingerprint,
)
from motiondirector.data.records import CacheRecord


def _spec(source, **overrides) -> DatasetSpec:
    return DatasetSpec(**{"sources": [str(source)], "caption": "a car", "frames": 4, "fps": 8.0, "size": (32, 32),
                          **overrides})


def test_decode_car_turn_sliding(car_turn):
    spec = _spec(car_turn, mode="sliding", stride=4)
    (item,) = list_items(spec)
    clips = decode_item(item, spec)
    assert [c.frame_indices for c in clips] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [c.clip_index for c in clips] == [0, 1, 2, 3]
    first = clips[0]
    assert (first.dataset, first.video_index, first.caption, first.source_fps, first.size, first.crop,
            first.is_image) == ("car-turn", 0, "a car", 8.0, (32, 32), "center", False)
    assert first.frames.shape == (4, 32, 32, 3) and first.frames.dtype == np.uint8
    assert len(first.content_hash) == 64 and all(c.content_hash == first.content_hash for c in clips)
    assert not np.array_equal(clips[0].frames[0], clips[3].frames[3])


def test_decode_with_buckets_picks_the_aspect(reference_dir):
    path = next((reference_dir / "bicycle").glob("*young-hipster*.mp4"))
    spec = _spec(path, buckets=[(32, 32), (32, 56)])
    (clip,) = decode_item(list_items(spec)[0], spec)
    assert (clip.size, clip.crop, clip.frames.shape) == ((32, 56), "bucket", (4, 32, 56, 3))
    assert clip.frame_indices == [0, 3, 6, 9]


def test_image_clips_with_hflip(reference_dir):
    spec = _spec(reference_dir / "img_car" / "car.jpg", hflip=0.5)
    plain, mirrored = decode_item(list_items(spec)[0], spec)
    assert plain.frames.shape == (4, 32, 32, 3) and plain.is_image and plain.frame_indices == [0, 0, 0, 0]
    assert all(np.array_equal(plain.frames[0], frame) for frame in plain.frames)  # the image repeated
    np.testing.assert_array_equal(mirrored.frames, plain.frames[:, :, ::-1])
    assert (plain.crop, mirrored.crop) == ("center", "center+hflip")
    assert (plain.extra, mirrored.extra) == ({"hflip": False, "weight": 0.5}, {"hflip": True, "weight": 0.5})
    (only,) = decode_item(list_items(spec)[0], spec.model_copy(update={"hflip": 1.0}))
    assert only.crop == "center+hflip"
    (unflipped,) = decode_item(list_items(spec)[0], spec.model_copy(update={"hflip": 0.0}))
    assert unflipped.extra == {} and unflipped.crop == "center"


def test_decode_bad_file_names_it(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"")
    spec = _spec(tmp_path)
    with pytest.raises(DataError, match=r"broken\.mp4: zero-byte file"):
        decode_item(list_items(spec)[0], spec)


def test_encode_clips(tiny_backbone, car_turn):
    spec = _spec(car_turn, mode="sliding", stride=6)
    clips = decode_item(list_items(spec)[0], spec)
    records = encode_clips(tiny_backbone, clips)
    assert len(records) == 3
    record = records[0]
    assert record.latent_mean.shape == record.latent_std.shape == (4, 4, 16, 16)  # (C, F, h, w)
    assert record.latent_mean.dtype == record.latent_std.dtype == record.text_embedding.dtype == np.float16
    assert record.text_embedding.shape == (16, 32) and (record.latent_std > 0).all()
    direct = tiny_backbone.encode_video(torch.from_numpy(clips[0].frames[None]))
    np.testing.assert_allclose(record.latent_mean, direct.mean[0].numpy(), atol=1e-3, rtol=1e-3)
    assert record.latent_fingerprint == latent_fingerprint(
        clips[0].content_hash, [0, 1, 2, 3], (32, 32), "center", tiny_backbone.vae_id)
    assert record.text_fingerprint == text_fingerprint("a car", tiny_backbone.text_encoder_id)
    assert [r.frame_indices[0] for r in records] == [0, 6, 12] and records[2].caption == "a car"
    # as Ray Data hands rows back: plain dicts whose lists became numpy arrays
    rows = [{**vars(clip), "frame_indices": np.array(clip.frame_indices), "size": np.array(clip.size)}
            for clip in clips]
    from_rows = table_to_records(records_to_table(encode_clips(tiny_backbone, [DecodedClip(**row) for row in rows])))
    assert [(r.latent_fingerprint, r.size, r.frame_indices) for r in from_rows] == \
        [(r.latent_fingerprint, r.size, r.frame_indices) for r in records]
    again = encode_clips(tiny_backbone, clips, batch_size=3)  # deterministic: no sampling, batching aside
    for first, second in zip(records, again, strict=True):
        np.testing.assert_allclose(first.latent_mean, second.latent_mean, atol=2e-3)
        np.testing.assert_array_equal(first.text_embedding, second.text_embedding)


def test_fingerprints_depend_on_exactly_their_inputs():
    base = dict(content_hash="h", frame_indices=[0, 3], size=(32, 32), crop="center", vae_id="vae")
    reference = latent_fingerprint(**base)
    assert latent_fingerprint(**{**base, "frame_indices": (0, 3)}) == reference
    for key, other in (("content_hash", "h2"), ("frame_indices", [0, 4]), ("size", (32, 48)), ("crop", "bucket"),
                       ("vae_id", "vae2")):
        assert latent_fingerprint(**{**base, key: other}) != reference, key
    assert text_fingerprint("a car", "te") != text_fingerprint("a cat", "te") != text_fingerprint("a car", "te2")
    assert text_fingerprint("a car", "te") == text_fingerprint("a car", "te")


def test_plan_fingerprints_follow_the_spec(car_turn):
    def keys(**overrides):
        spec = _spec(car_turn, **overrides)
        (plan,) = plan_item(list_items(spec)[0], spec)
        return plan.latent_fingerprint("vae"), plan.text_fingerprint("te")

    latent, text = keys()
    for overrides, latent_changes, text_changes in (
        ({"caption": "another caption"}, False, True),
        ({"size": (32, 48)}, True, False),
        ({"fps": 4}, True, False),  # other source frames
    ):
        new_latent, new_text = keys(**overrides)
        assert (new_latent != latent, new_text != text) == (latent_changes, text_changes), overrides
    assert keys(name="renamed", concept="turning") == (latent, text)  # naming is not content


def _record(**overrides) -> CacheRecord:
    rng = np.random.default_rng(0)
    fields = dict(dataset="d", video_path="s3://b/v.mp4", video_index=2, content_hash="c" * 64, clip_index=1,
                  frame_indices=[0, 3, 6], source_fps=29.97002997, caption="ünïcode caption", size=(32, 48),
                  crop="bucket", latent_mean=rng.standard_normal((4, 3, 4, 6)).astype(np.float16),
                  latent_std=rng.random((4, 3, 4, 6)).astype(np.float16),
                  text_embedding=rng.standard_normal((16, 32)).astype(np.float16),
                  latent_fingerprint="l" * 32, text_fingerprint="t" * 32, concept=None, is_image=False,
                  extra={"hflip": True, "weight": 0.25})
    return CacheRecord(**{**fields, **overrides})


def _assert_same(first: CacheRecord, second: CacheRecord) -> None:
    for field in dataclasses.fields(CacheRecord):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), field.name
        else:
            assert a == b and type(a) is type(b), field.name


def test_parquet_round_trip_is_exact(tmp_path):
    records = [_record(), _record(concept="bikes", is_image=True, video_index=0, extra={},
                                  text_embedding=np.arange(6, dtype=np.float32).reshape(2, 3))]
    table = records_to_table(records)
    assert table.schema.equals(RECORD_SCHEMA)
    pq.write_table(table, tmp_path / "records.parquet")
    back = table_to_records(pq.read_table(tmp_path / "records.parquet"))
    for original, restored in zip(records, back, strict=True):
        _assert_same(original, restored)
    # readable with pyarrow + numpy alone: bytes + shape + dtype columns
    row = pq.read_table(tmp_path / "records.parquet").slice(0, 1).to_pylist()[0]
    mean = np.frombuffer(row["latent_mean"], dtype=row["latent_mean_dtype"]).reshape(row["latent_mean_shape"])
    np.testing.assert_array_equal(mean, records[0].latent_mean)
    with pytest.raises(ValueError, match="missing columns"):
        table_to_records(table.drop_columns(["caption"]))
