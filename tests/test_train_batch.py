"""`motiondirector train-batch` on the shared local Ray cluster: a six-job spec from an ingest output with one
injected worker kill, idempotent re-runs, a two-worker DeepSpeed ZeRO-2 job, and spec errors before Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from motiondirector.cli import app
from motiondirector.data.ingest_spec import IngestDataset
from motiondirector.video_io import write_video

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"frames": 4, "fps": 8, "size": [32, 32]}


def ingest_in_process(output: Path, model_dir: Path, datasets: list[IngestDataset]) -> None:
    """A committed ingest output built with the library's single-process path (decode, encode, write, commit):
    the same files `motiondirector ingest` commits, without starting a Ray Data pipeline."""
    from motiondirector.backbones import load_backbone
    from motiondirector.data.encode import decode_item, encode_clips
    from motiondirector.data.ingest_store import (
        DatasetState,
        IngestStore,
        LiveClip,
        new_run_id,
        write_records,
    )
    from motiondirector.data.sources import list_items

    backbone = load_backbone(str(model_dir), "cpu")
    store = IngestStore(str(output))
    run_id = new_run_id()
    folder = store.run_folder(run_id, temporary=True)
    files, states = [], {}
    for dataset in datasets:
        records = encode_clips(backbone, [clip for item in list_items(dataset) for clip in decode_item(item, dataset)])
        files.append(write_records(store, folder, dataset.name, records))
        states[dataset.name] = DatasetState(
            base=str(model_dir), vae_id=backbone.vae_id, text_encoder_id=backbone.text_encoder_id,
            concept=dataset.concept, spec=dataset.model_dump(mode="json"),
            clips=[LiveClip.of(r, r.latent_fingerprint, r.text_fingerprint) for r in records])
    assert store.commit_run(run_id, files, [], states) is not None


@pytest.fixture(scope="module")
def ingest_output(tmp_path_factory, tiny_model_dir, car_turn) -> Path:
    folder = tmp_path_factory.mktemp("batch-ingest")
    boxes = folder / "boxes"
    boxes.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        write_video(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), boxes / f"clip{index}.mp4", fps=8)
    output = folder / "ingest"
    ingest_in_process(output, tiny_model_dir, [
        IngestDataset(name="car-turn", sources=[str(car_turn)], caption="a car running on the road", **SMALL),
        IngestDataset(name="boxes", sources=[str(boxes)], caption="a box moves", **SMALL)])
    return output


def defaults(model_dir: Path, **changes) -> dict:
    return {"base": str(model_dir), "device": "cpu", "steps": 4, "lora": {"rank": 4},
            "mixed_precision": "no", "gradient_checkpointing": False, "checkpoint_every": 2,
            "validation": {"steps": 2, "frames": 4, "size": [32, 32]}, **changes}


def write_spec(folder: Path, spec: dict) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(*args: str) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(app, ["train-batch", *args, "--json"])
    start = result.stdout.find('{\n  "batch_id"')  # Ray Train may print lines of its own on stdout
    payload = json.loads(result.stdout[start:]) if start >= 0 else None
    return result.exit_code, payload, result.output


def package_weights(catalog: Path, catalog_id: str) -> dict:
    return load_file(str(catalog / "loras" / catalog_id / "adapter_model.safetensors"))


# --- the spec, without Ray --------------------------------------------------------------------------------

def test_spec_expands_jobs_from_ingest_and_grid_and_keys_ignore_non_weight_settings(tmp_path, ingest_output,
                                                                                     tiny_model_dir):
    from pipelines.batch_spec import load_batch_spec

    spec = {"defaults": defaults(tiny_model_dir),
            "from_ingest": {"uri": str(ingest_output), "exclude": ["car*"]},
            "jobs": [{"name": "car", "dataset": f"{ingest_output}#car-turn", "overrides": ["ad_beta=0.5"]}],
            "grid": {"lora.rank": [2, 8]}}
    jobs = load_batch_spec(write_spec(tmp_path, spec)).jobs
    assert sorted(j.name for j in jobs) == ["boxes--lora.rank=2", "boxes--lora.rank=8", "car--lora.rank=2",
                                            "car--lora.rank=8"]
    car = next(j for j in jobs if j.name == "car--lora.rank=8")
    assert car.config["lora"]["rank"] == 8 and car.config["ad_beta"] == 0.5
    assert car.dataset == f"{ingest_output}#car-turn"
    assert len(car.lineage["record_fingerprints"]) == 1 and car.lineage["code_version"]["package"]
    # checkpoint cadence and validation do not change the weights: same key; steps do: another key
    (tmp_path / "a").mkdir()
    spec["defaults"] = defaults(tiny_model_dir, checkpoint_every=1, validation={"steps": 3})
    same = {j.name: j.key for j in load_batch_spec(write_spec(tmp_path / "a", spec)).jobs}
    assert same == {j.name: j.key for j in jobs}
    spec["defaults"] = defaults(tiny_model_dir, steps=5)
    assert not set(same.values()) & {j.key for j in load_batch_spec(write_spec(tmp_path / "a", spec)).jobs}


def test_bad_spec_exits_2_naming_job_and_key_without_starting_ray(tmp_path, ingest_output, tiny_model_dir):
    """In a fresh process: the exit code, the message, and that Ray was never imported."""
    spec = write_spec(tmp_path, {"defaults": defaults(tiny_model_dir), "jobs": [
        {"name": "fine", "dataset": f"{ingest_output}#car-turn"},
        {"name": "typo", "dataset": f"{ingest_output}#car-turn", "overrides": {"lora.rnk": 2}}]})
    missing = tmp_path / "missing"
    missing.mkdir()
    missing_spec = write_spec(missing, {"defaults": defaults(tiny_model_dir), "jobs": [
        {"name": "nope", "dataset": f"{ingest_output}#no-such-dataset"}]})
    probe = ("import json, sys\nfrom typer.testing import CliRunner\nfrom motiondirector.cli import app\n"
             "out = []\nfor spec in sys.argv[1:]:\n"
             "    r = CliRunner().invoke(app, ['train-batch', spec, '--storage', spec + '.storage'])\n"
             "    out.append({'code': r.exit_code, 'output': ' '.join(r.output.split())})\n"
             "print(json.dumps({'runs': out, 'ray': 'ray' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(spec), str(missing_spec)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    typo, nope = result["runs"]
    assert typo["code"] == 2 and "job 'typo'" in typo["output"] and "lora.rnk" in typo["output"]
    assert "lora.rank" in typo["output"]  # the suggestion
    assert nope["code"] == 2 and "job 'nope'" in nope["output"] and "no-such-dataset" in nope["output"]
    assert result["ray"] is False
    assert not Path(f"{spec}.storage").exists() and not Path(f"{missing_spec}.storage").exists()


def test_live_table_shows_states_steps_and_counts():
    from rich.console import Console

    from motiondirector.commands.train_batch import render

    snapshot = {"batch_id": "b1", "jobs": [
        {"name": "a", "state": "running", "step": 2, "steps": 8, "it_s": 0.5, "losses": {"loss_temporal": 1.25}},
        {"name": "b", "state": "failed", "steps": 8, "error": "ValueError: boom"},
        {"name": "c", "state": "done", "step": 8, "steps": 8, "catalog_ids": ["X1", "X2"], "resumed_from": 4}]}
    console = Console(width=200, record=True)
    console.print(render(snapshot))
    text = console.export_text()
    assert "2/8" in text and "temporal 1.2500" in text and "0:12" in text  # 6 steps left at 0.5 it/s
    assert "ValueError: boom" in text and "8/8 (from 4)" in text and "X1, X2" in text
    assert "queued 0  running 1  done 1  skipped 0  failed 1" in text


# --- on the cluster ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_run(ray_local, tmp_path_factory, ingest_output, tiny_model_dir):
    """Six jobs that succeed (one survives a worker kill) and one whose kill exceeds max_failures=0."""
    folder = tmp_path_factory.mktemp("batch-six")
    car = f"{ingest_output}#car-turn"
    spec = write_spec(folder, {
        "defaults": defaults(tiny_model_dir),
        "resources": {"cpus_per_job": 1, "max_failures": 2},
        "jobs": [{"name": "car-killed", "dataset": car, "fault_injection": {"kill_at_step": 3}},
                 {"name": "car-clean", "dataset": car},
                 {"name": "car-rank2", "dataset": car, "overrides": {"lora.rank": 2}},
                 {"name": "boxes-beta", "dataset": f"{ingest_output}#boxes", "overrides": {"ad_beta": 0.5}},
                 {"name": "car-fails-once", "dataset": car, "fault_injection": {"kill_at_step": 3},
                  "resources": {"max_failures": 0}}],
        "from_ingest": {"uri": str(ingest_output), "prefix": "ingest-"}})
    storage, catalog = folder / "storage", folder / "catalog"
    code, report, output = run_cli(str(spec), "--storage", str(storage), "--catalog", str(catalog))
    assert code == 1 and report is not None, output  # exit 1: a job failed
    return spec, storage, catalog, report


def same_loras(catalog: Path, ids_a: list[str], ids_b: list[str]) -> bool:
    if len(ids_a) != len(ids_b):
        return False
    for a, b in zip(ids_a, ids_b, strict=True):
        wa, wb = package_weights(catalog, a), package_weights(catalog, b)
        if wa.keys() != wb.keys() or not all((wa[k] == wb[k]).all() for k in wa):
            return False
    return True


@pytest.mark.ray
def test_six_jobs_complete_and_a_killed_worker_resumes_to_the_same_lora(batch_run):
    spec, storage, catalog, report = batch_run
    jobs = {job["name"]: job for job in report["jobs"]}
    assert sorted(jobs) == ["boxes-beta", "car-clean", "car-fails-once", "car-killed", "car-rank2", "ingest-boxes",
                            "ingest-car-turn"]
    assert report["counts"] == {"queued": 0, "running": 0, "done": 6, "skipped": 0, "failed": 1}
    assert json.loads(Path(report["report"]).read_text())["counts"]["done"] == 6
    assert Path(report["report"]).parent.parent == storage / "batches"
    # the kill happened, and the restarted worker began at the reported checkpoint of step 2, not at 0
    killed, clean = jobs["car-killed"], jobs["car-clean"]
    assert (storage / killed["job_id"] / ".fault-injected").read_text() == "3"
    assert killed["resumed_from"] == 2 and clean["resumed_from"] is None
    # ... and ended with bit-identical LoRAs (temporal + spatial) to the uninterrupted twin
    assert len(killed["catalog_ids"]) == 2 and same_loras(catalog, killed["catalog_ids"], clean["catalog_ids"])
    assert killed["rank_digests"] == clean["rank_digests"] != jobs["car-rank2"]["rank_digests"]
    # the job without retries failed, with the worker's death in the report and nothing registered
    failed = jobs["car-fails-once"]
    assert failed["state"] == "failed" and failed["catalog_ids"] == [] and "worker" in failed["error"].lower()
    # registered with losses, a preview and the job's lineage key
    from motiondirector.catalog import Catalog

    entries = Catalog(str(catalog)).query(limit=None)
    # temporal + one spatial LoRA per video: car-turn has one video, boxes two
    assert len(entries) == sum(len(job["catalog_ids"]) for job in jobs.values()) == 4 * 2 + 2 * 3
    assert all(e.preview for e in entries)
    temporal = Catalog(str(catalog)).get(killed["catalog_ids"][0])
    assert temporal.kind == "temporal" and temporal.step == 4 and temporal.losses["temporal"] > 0
    assert f"batch-key:{killed['key']}" in temporal.tags and killed["dataset"] in temporal.description
    assert (catalog / "loras" / temporal.id / "preview.gif").stat().st_size > 0


@pytest.mark.ray
def test_rerun_retries_the_failed_job_from_its_storage_then_trains_nothing(batch_run):
    spec, storage, catalog, first = batch_run
    before = {j["name"]: j for j in first["jobs"]}
    # second run: the failed job resumes from its last checkpoint in storage (same run name) -- the
    # path a killed driver's unfinished jobs take too; everything registered is skipped
    code, second, output = run_cli(str(spec), "--storage", str(storage), "--catalog", str(catalog))
    assert code == 0, output
    assert second["counts"]["skipped"] == 6 and second["counts"]["done"] == 1
    retried = next(j for j in second["jobs"] if j["name"] == "car-fails-once")
    assert retried["state"] == "done" and retried["resumed_from"] == 2
    assert same_loras(catalog, retried["catalog_ids"], before["car-clean"]["catalog_ids"])
    # third run: nothing to train, no new Ray Train run folder, no new catalog entry
    runs = sorted(p.name for p in storage.iterdir())
    code, third, output = run_cli(str(spec), "--storage", str(storage), "--catalog", str(catalog))
    assert code == 0, output
    assert third["counts"]["skipped"] == 7 and third["counts"]["done"] == 0
    assert {j["name"]: sorted(j["catalog_ids"]) for j in third["jobs"]} == \
        {j["name"]: sorted(j["catalog_ids"]) for j in second["jobs"]}
    assert sorted(p.name for p in storage.iterdir()) == runs
    assert len(list((storage / "batches").iterdir())) == 3
    assert len(list((catalog / "loras").iterdir())) == 16


@pytest.mark.ray
def test_two_worker_deepspeed_zero2_job_has_identical_loras_across_ranks(ray_local, tmp_path, ingest_output,
                                                                         tiny_model_dir):
    spec = write_spec(tmp_path, {
        "defaults": defaults(tiny_model_dir, steps=2, engine={"kind": "deepspeed", "zero_stage": 2},
                             spatial_lora="shared"),
        "resources": {"workers": 2, "cpus_per_job": 1, "max_failures": 0},
        "preview": {"enabled": False},
        "jobs": [{"name": "ds", "dataset": f"{ingest_output}#boxes"}]})
    code, report, output = run_cli(str(spec), "--storage", str(tmp_path / "storage"),
                                   "--catalog", str(tmp_path / "catalog"))
    assert code == 0, output
    (job,) = report["jobs"]
    assert job["state"] == "done" and job["workers"] == 2
    assert set(job["rank_digests"]) == {"0", "1"}
    assert job["rank_digests"]["0"] == job["rank_digests"]["1"]
    assert len(job["catalog_ids"]) == 2
