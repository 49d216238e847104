"""The whole pipeline on a simulated multi-node Ray cluster, with a node lost during training.

tests/multinode_sim.py runs in a subprocess (a `ray.cluster_utils.Cluster` brings its own head, so it
must not meet the session's `ray_local` cluster): head + a "decode" node + two "gpu" nodes (custom
resources), tiny model. Two end-to-end runs (ingest -> train-batch -> catalog -> one Serve request):
storage on the moto S3 server through fsspec, then on a local folder shared by all nodes with one gpu
node removed after its job's first checkpoint. The numbers are in docs/operations.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import s3_endpoint, s3_root  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 2  # as in multinode_sim.py

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, s3_endpoint):  # noqa: F811
    """Runs the simulation once for the module; s3 settings reach the subprocess (and its Ray nodes) as env."""
    import uuid

    import fsspec

    work = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("RAY_ADDRESS", None)
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, key="testing", secret="testing")
    if not fs.exists("multinode-tests"):
        fs.mkdir("multinode-tests")
    s3 = f"s3://multinode-tests/{uuid.uuid4().hex}"
    local = work / "shared"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_sim.py"), str(work / "sim"), s3,
                           f"{local}:kill"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - began
    print(json.dumps(result, indent=1))  # the numbers docs/operations.md quotes (pytest -s)
    return result, s3, local


def check_end_to_end(run: dict) -> None:
    # ingest: both datasets committed, one clip each, decode/encode pinned to the custom resources
    assert run["ingest_commit"] and run["ingest"] == {"boxes": 1, "stripes": 1}
    # train-batch: both jobs done, each registered a temporal + a spatial LoRA trained to the last step
    assert run["counts"]["done"] == 2 and run["counts"]["failed"] == 0
    jobs = {job["name"]: job for job in run["jobs"]}
    assert sorted(jobs) == ["boxes", "stripes"]
    ids = sorted(i for job in jobs.values() for i in job["catalog_ids"])
    assert all(len(job["catalog_ids"]) == 2 for job in jobs.values())
    # the catalog holds exactly what the report says, every package verified against its hashes
    assert run["catalog"]["ids"] == ids and run["catalog"]["verified"] == 4
    assert run["catalog"]["steps"] == [run["steps"]]
    # every training attempt ran on a gpu node (the batch spec's custom resource), never on head/decode
    assert all(a["node"] in ("gpu-a", "gpu-b") for job in jobs.values() for a in job["attempts"])
    # Serve answered one generation with a LoRA of this batch
    served = run["serve"]
    assert served["status_code"] == 200 and served["status"] == "done" and served["mp4_bytes"] > 100
    assert len(served["loras"]) == 1 and served["loras"][0] in ids


def test_pipeline_on_a_simulated_cluster_with_s3_storage(simulation):
    result, s3, _ = simulation
    run = result["runs"][0]
    assert run["root"] == s3 and not run["kill"]
    check_end_to_end(run)
    assert run["report_uri"].startswith(f"{s3}/storage/batches/")
    # one job per gpu node, nothing moved, nothing resumed
    jobs = run["jobs"]
    assert sorted(job["attempts"][0]["node"] for job in jobs) == ["gpu-a", "gpu-b"]
    assert run["moved"] == [] and all(len(j["attempts"]) == 1 and j["resumed_from"] is None for j in jobs)


def test_losing_a_gpu_node_moves_its_job_which_resumes_from_its_checkpoint(simulation):
    result, _, local = simulation
    run = result["runs"][1]
    assert run["root"] == str(local) and run["kill"]
    removed = run["removed"]
    assert removed is not None and removed["node"] in ("gpu-a", "gpu-b")
    check_end_to_end(run)
    jobs = {job["name"]: job for job in run["jobs"]}
    moved = jobs[removed["job"]]
    survivor = next(job for name, job in jobs.items() if name != removed["job"])
    # the batch report names the moved job; its attempts: first on the lost node, then on the other one
    assert run["moved"] == [removed["job"]] and moved["moved"] and not survivor["moved"]
    assert [a["node"] for a in moved["attempts"]][:1] == [removed["node"]]
    assert moved["attempts"][-1]["node"] != removed["node"] and moved["attempts"][-1]["node"].startswith("gpu")
    # resumed from its registered checkpoint, not restarted
    assert moved["attempts"][0]["resumed_from"] is None
    assert moved["resumed_from"] == moved["attempts"][-1]["resumed_from"] >= CHECKPOINT_EVERY
    assert survivor["resumed_from"] is None and len(survivor["attempts"]) == 1
    # its checkpoints live in the folder every node shares: the resumed step's and the last one
    folder = Path(local) / "storage" / moved["job_id"]
    assert (folder / f"step-{run['steps']}").is_dir() and (folder / "checkpoint_manager_snapshot.json").is_file()
    report = json.loads(Path(run["report_uri"]).read_text())
    assert report["moved"] == [removed["job"]]
    assert [a["resumed_from"] for a in next(j for j in report["jobs"] if j["name"] == removed["job"])["attempts"]][-1] \
        == moved["resumed_from"]
