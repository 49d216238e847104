"""Ray Data ingestion on the shared local cluster: reference + generated + broken files, committed output,
equality with the single-process library path, incremental re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.data.encode import decode_item, encode_clips
from motiondirector.data.errors import DataError
from motiondirector.data.ingest_read import read_ingested, read_rejects
from motiondirector.data.ingest_spec import load_ingest_spec
from motiondirector.data.ingest_store import IngestStore
from motiondirector.data.records import RECORD_SCHEMA
from motiondirector.data.sources import list_items
from motiondirector.video_io import write_video

pytestmark = pytest.mark.ray

SMALL = {"frames": 4, "size": [32, 32]}  # keep decode and the tiny VAE cheap
BROKEN = {  # file name -> start of the reject reason
    "empty.mp4": "zero-byte file",
    "notes.mp4": "not a video",
    "cut.mp4": "truncated or corrupt video",
    "short.mp4": "too short",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, car_turn) -> Path:
    folder = tmp_path_factory.mktemp("ingest-sources")
    generated = folder / "generated"
    generated.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        write_video(rng.integers(0, 256, (12, 40, 48, 3), dtype=np.uint8), generated / f"clip{index}.mp4", fps=8)
    write_video(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), generated / "short.mp4", fps=8)
    (generated / "empty.mp4").write_bytes(b"")
    (generated / "notes.mp4").write_text("these are not the frames you are looking for\n" * 20)
    (generated / "cut.mp4").write_bytes(car_turn.read_bytes()[:60_000])  # its index (moov) is at the end
    return folder


def _spec_file(folder: Path, reference: Path, generated: Path, car_caption: str = "A car turns.",
               generated_size: int = 32) -> Path:
    # Non-default scheduling knobs (two files per decode task, a half-CPU single-threaded encoder): the
    # records must not depend on them (test_ray_latents_equal_the_single_process_library_path).
    spec = {"batch_size": 2, "device": "cpu", "files_per_decode_task": 2, "encoder_cpus": 0.5, "encoder_threads": 1,
            "datasets": [
        {"name": "bicycle", "sources": str(reference / "bicycle"), "caption": "A person is riding a bicycle.", **SMALL},
        {"name": "car-turn", "sources": str(reference / "car_turn" / "car-turn.mp4"), "caption": car_caption,
         **SMALL},
        {"name": "terracotta", "sources": str(reference / "Terracotta_Warrior" / "*.jpg"), "kind": "image",
         "caption": "A Terracotta Warrior.", **SMALL},
        {"name": "generated", "sources": str(generated), "caption": "a box moves", "frames": 4,
         "size": [generated_size, generated_size]},
    ]}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _ingest(spec: Path, output: Path, model: Path) -> dict:
    result = CliRunner().invoke(app, ["ingest", str(spec), "--output", str(output), "--base", str(model), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first_run(ray_local, sources, reference_dir, tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("ingest-out")
    spec = _spec_file(sources, reference_dir, sources / "generated")
    return spec, output, _ingest(spec, output, tiny_model_dir)


def test_run_commits_all_datasets_and_records_rejects(first_run, sources):
    spec, output, summary = first_run
    counts = {name: (s["clips"], s["encoded"], s["rejected"]) for name, s in summary["datasets"].items()}
    assert counts == {"bicycle": (4, 4, 0), "car-turn": (1, 1, 0), "terracotta": (8, 8, 0),
                      "generated": (3, 3, len(BROKEN))}
    assert summary["commit"]
    reasons = {Path(r["path"]).name: r["reason"] for r in summary["rejects"]}
    assert reasons.keys() == BROKEN.keys()
    for name, start in BROKEN.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    # The committed rejects table says the same, readable with pyarrow alone.
    table = read_rejects(str(output))
    assert sorted(Path(p).name for p in table.column("path").to_pylist()) == sorted(BROKEN)
    assert set(table.column("dataset").to_pylist()) == {"generated"}
    assert all(e.startswith("DataError: ") for e in table.column("error").to_pylist())
    # Layout: one commit; records partitioned by dataset, plain Parquet with the record schema; no temp folder.
    store = IngestStore(str(output))
    (name, manifest), = store.commits()
    assert name == summary["commit"]
    assert sorted({f.dataset for f in manifest.records}) == ["bicycle", "car-turn", "generated", "terracotta"]
    for data_file in manifest.records:
        assert data_file.path.startswith(f"runs/{manifest.run_id}/records/{data_file.dataset}/")
        table = pq.read_table(output / data_file.path)
        assert table.schema.equals(RECORD_SCHEMA) and set(table.column("dataset").to_pylist()) == {data_file.dataset}
    assert not list((output / "runs").glob("*.tmp"))


def test_ray_latents_equal_the_single_process_library_path(first_run, tiny_backbone):
    spec_path, output, _ = first_run
    spec = load_ingest_spec(spec_path, base="unused")
    for dataset in spec.datasets:
        dataset = dataset.with_model_defaults(tiny_backbone.defaults)  # as the ingest run does (same model)
        clips = []
        for item in list_items(dataset):
            try:
                clips += decode_item(item, dataset)
            except DataError:  # the broken files: rejected by the pipeline too
                continue
        expected = encode_clips(tiny_backbone, clips)
        got = read_ingested(str(output), dataset.name, vae_id=tiny_backbone.vae_id)
        assert [(r.video_path, r.video_index, r.clip_index, r.frame_indices, r.latent_fingerprint,
                 r.text_fingerprint) for r in got] == \
            [(r.video_path, r.video_index, r.clip_index, r.frame_indices, r.latent_fingerprint,
              r.text_fingerprint) for r in expected]
        for ray_record, local in zip(got, expected, strict=True):
            assert ray_record.latent_mean.dtype == np.float16 and ray_record.latent_mean.shape == (4, 4, 16, 16)
            # Batches of 2 in the actor vs 1 here: the same up to float rounding.
            np.testing.assert_allclose(ray_record.latent_mean, local.latent_mean, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(ray_record.latent_std, local.latent_std, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(ray_record.text_embedding, local.text_embedding, rtol=1e-3, atol=1e-3)


def test_rerun_writes_nothing_and_changes_reencode_only_what_changed(first_run, sources, reference_dir,
                                                                     tiny_model_dir):
    spec, output, _ = first_run
    before = _files(output)
    again = _ingest(spec, output, tiny_model_dir)
    assert again["commit"] is None and _files(output) == before
    assert {n: (s["kept"], s["encoded"], s["reused"]) for n, s in again["datasets"].items()} == \
        {"bicycle": (4, 0, 0), "car-turn": (1, 0, 0), "terracotta": (8, 0, 0), "generated": (3, 0, 0)}

    # One run, two changes: a new size re-encodes latents, a new caption re-encodes only the text.
    old_generated = {r.video_path: r for r in read_ingested(str(output), "generated")}
    old_car, = read_ingested(str(output), "car-turn")
    changed = _spec_file(sources, reference_dir, sources / "generated", car_caption="A car is turning left.",
                         generated_size=48)
    third = _ingest(changed, output, tiny_model_dir)
    assert third["commit"]
    assert {n: (s["kept"], s["encoded"], s["reused"]) for n, s in third["datasets"].items()} == \
        {"bicycle": (4, 0, 0), "car-turn": (0, 0, 1), "terracotta": (8, 0, 0), "generated": (0, 3, 0)}
    generated = read_ingested(str(output), "generated")
    assert {r.latent_mean.shape for r in generated} == {(4, 4, 24, 24)}
    assert all(r.latent_fingerprint != old_generated[r.video_path].latent_fingerprint for r in generated)
    assert all(r.text_fingerprint == old_generated[r.video_path].text_fingerprint for r in generated)
    car, = read_ingested(str(output), "car-turn")
    assert car.caption == "A car is turning left." and car.text_fingerprint != old_car.text_fingerprint
    assert car.latent_fingerprint == old_car.latent_fingerprint
    np.testing.assert_array_equal(car.latent_mean, old_car.latent_mean)  # copied from the committed row
    # The superseded rows stay in the committed files until --prune.
    rows = sum(pq.read_metadata(p).num_rows for p in output.rglob("records/*/*.parquet"))
    assert rows == 16 + 3 + 1


def test_training_consumes_the_ingest_output_without_the_vae(first_run, tiny_model_dir, tiny_backbone, tmp_path,
                                                             monkeypatch):
    from motiondirector.config import validate_config
    from motiondirector.lora.package import read_manifest
    from motiondirector.train.loop import train

    _, output, _ = first_run
    config = validate_config({
        "base": str(tiny_model_dir), "device": "cpu", "steps": 2, "lora": {"rank": 4}, "mixed_precision": "no",
        "gradient_checkpointing": False, "checkpoint_every": 0, "validation": {"every": 0},
        "data": {"dataset": f"{output}#bicycle"}}, "test config")

    def no_vae(*args, **kwargs):
        raise AssertionError("training encoded video although the dataset is ingested")

    monkeypatch.setattr(tiny_backbone, "encode_video", no_vae)
    summary = train(config, tmp_path / "run", backbone=tiny_backbone)
    assert summary.steps == 2 and summary.routing == "per_video" and len(summary.packages["spatial"]) == 4
    ingested = read_ingested(str(output), "bicycle")
    manifest = read_manifest(summary.packages["temporal"])
    assert sorted(manifest.data_fingerprints) == sorted(r.latent_fingerprint for r in ingested)


def test_unavailable_base_model_exits_3(first_run, tmp_path):
    spec, _, _ = first_run
    result = CliRunner().invoke(app, ["ingest", str(spec), "--output", str(tmp_path / "out"),
                                      "--base", str(tmp_path / "no-model")])
    assert result.exit_code == 3 and "no-model" in result.output
    assert not (tmp_path / "out" / "commits").exists()
