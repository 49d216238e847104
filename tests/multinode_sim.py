"""A simulated multi-node Ray cluster running the whole pipeline: ingest -> train-batch -> catalog -> Serve.

Run by tests/test_multinode.py as a subprocess (a `ray.cluster_utils.Cluster` needs its own head, so it
cannot share the test session's local cluster):

    python tests/multinode_sim.py WORK_DIR ROOT[:kill] [ROOT[:kill] ...]

One cluster on this machine: a head (1 CPU: driver, job orchestration, Serve), a "decode" node
(1 CPU + custom resource `decode`) and two "gpu" nodes (1 CPU + `gpu_node` each; no real GPU).
The ingest spec pins plan/decode tasks to `decode` and the encoder to `gpu_node`; the batch spec
pins every training worker to `gpu_node`, one job per gpu node. Each ROOT (a local folder shared by
all nodes, or an `s3://` URI reached through fsspec) gets one end-to-end run with the tiny model;
with `:kill` (8 steps per job instead of 4, checkpoints every 2) the gpu node of one job is removed
(`Cluster.remove_node`, no grace) as soon as that job's first checkpoint is registered in storage, so
Ray Train must restart the job on the other gpu node from that checkpoint. Prints one JSON line (the last line of stdout) with what happened and how long it took.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

# Before Ray starts: a restarted worker group may wait for the surviving node's gpu_node slot (held by the
# other job until it finishes) longer than Ray Train's default 60 s start timeout on a slow machine.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fsspec  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from motiondirector import api  # noqa: E402
from motiondirector.backbones.tiny import write_tiny_model  # noqa: E402
from motiondirector.video_io import write_video  # noqa: E402

NODE_START_TIMEOUT_S = 180
CHECKPOINT_EVERY = 2
STEPS = {False: 4, True: 8}  # per job; with a node removal, steps enough to remove it between checkpoints


def start_cluster() -> tuple[Cluster, dict[str, object]]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {"decode": cluster.add_node(wait=False, num_cpus=1, resources={"decode": 1}),
             "gpu-a": cluster.add_node(wait=False, num_cpus=1, resources={"gpu_node": 1}),
             "gpu-b": cluster.add_node(wait=False, num_cpus=1, resources={"gpu_node": 1})}
    cluster.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, nodes


def write_sources(folder: Path) -> dict[str, Path]:
    """Two datasets of one short random video each (the content does not matter to the plumbing)."""
    rng = np.random.default_rng(0)
    out = {}
    for name in ("boxes", "stripes"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        out[name] = write_video(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), folder / name / "a.mp4", fps=8)
    return out


def ingest(root: str, model: Path, sources: dict[str, Path]) -> dict:
    from pipelines.ingest import run_ingest

    spec = api.IngestSpec(output=f"{root}/ingest", base=str(model), device="cpu", batch_size=2,
                          decode_resources={"decode": 1}, encoder_resources={"gpu_node": 1},
                          datasets=[{"name": name, "sources": [str(path)], "caption": f"{name} move",
                                     "frames": 4, "fps": 8, "size": [32, 32]} for name, path in sources.items()])
    return run_ingest(spec).as_dict()


def batch_spec(folder: Path, root: str, model: Path, steps: int) -> Path:
    spec = {"storage": f"{root}/storage", "catalog": f"{root}/catalog",
            "defaults": {"base": str(model), "device": "cpu", "steps": steps, "lora": {"rank": 4},
                         "mixed_precision": "no", "gradient_checkpointing": False,
                         "checkpoint_every": CHECKPOINT_EVERY},
            "resources": {"cpus_per_job": 1, "custom": {"gpu_node": 1}, "max_failures": 3},
            "preview": {"enabled": False},
            "from_ingest": {"uri": f"{root}/ingest"}}
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class NodeKiller:
    """on_update observer of run_batch: removes the gpu node of the first job whose first checkpoint is
    registered (Ray Train's checkpoint_manager_snapshot.json in the job's storage folder) while at least
    two steps are left (so the job still has to train, not just register its LoRAs)."""

    def __init__(self, cluster: Cluster, nodes: dict[str, object], storage: str, steps: int) -> None:
        self.cluster, self.nodes, self.storage, self.steps = cluster, nodes, storage, steps
        self.removed: dict | None = None

    def __call__(self, snapshot: dict) -> None:
        if self.removed is not None:
            return
        for row in snapshot["jobs"]:
            label = next((name for name, node in self.nodes.items() if node.node_id == row.get("node_id")), None)
            if row["state"] != "running" or label is None or not label.startswith("gpu") \
                    or row.get("step", 0) > self.steps - 2:
                continue
            fs, path = fsspec.core.url_to_fs(f"{self.storage}/{row['job_id']}/checkpoint_manager_snapshot.json")
            if not fs.exists(path):
                continue
            self.cluster.remove_node(self.nodes[label], allow_graceful=False)
            self.removed = {"node": label, "node_id": row["node_id"], "job": row["name"], "at_step": row.get("step"),
                            "at": time.time()}
            del self.nodes[label]
            return


def serve_request(root: str, model: Path, port: int, lora_id: str) -> dict:
    from ray import serve

    from serve.app import application
    from serve.settings import ServeSettings

    settings = ServeSettings(base=str(model), catalog=f"{root}/catalog", device="cpu", threads=1, generator_cpus=0,
                             queue_limit=4, host="127.0.0.1", port=port)
    serve.run(application(settings), name="md-sim", route_prefix="/")
    body = {"prompt": "boxes move", "seed": 7, "steps": 2, "frames": 4, "height": 32, "width": 32,
            "motions": [{"lora_id": lora_id, "scale": 1.0}]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        response = http.post("/v1/generations", params={"wait": "true"}, json=body)
        job = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        video = http.get(job["links"]["video_mp4"]) if job.get("status") == "done" else None
        sidecar = http.get(job["links"]["sidecar"]).json() if job.get("status") == "done" else {}
    serve.delete("md-sim")
    return {"status_code": response.status_code, "status": job.get("status"),
            "loras": [lora["reference"] for lora in sidecar.get("loras", [])],
            "mp4_bytes": len(video.content) if video is not None and video.status_code == 200 else 0}


def scenario(work: Path, root: str, kill: bool, model: Path, sources: dict[str, Path], cluster: Cluster,
             nodes: dict[str, object], labels: dict[str, str], port: int) -> dict:
    from pipelines.batch_spec import load_batch_spec
    from pipelines.train_batch import run_batch

    folder = work / f"spec-{len(list(work.glob('spec-*')))}"
    folder.mkdir()
    began = time.perf_counter()
    ingested = ingest(root, model, sources)
    ingest_s = time.perf_counter() - began
    spec = load_batch_spec(batch_spec(folder, root, model, STEPS[kill]))
    killer = NodeKiller(cluster, nodes, f"{root}/storage", STEPS[kill]) if kill else None
    began = time.perf_counter()
    report = run_batch(spec, on_update=killer, poll_seconds=0.2)
    batch_s = time.perf_counter() - began
    catalog = api.open_catalog(f"{root}/catalog")
    entries = catalog.query(limit=None)
    verified = sum(catalog.resolve(entry.id, verify=True).is_dir() for entry in entries)  # raises on a bad hash
    temporal = next(e for e in entries if e.kind == "temporal")
    began = time.perf_counter()
    served = serve_request(root, model, port, temporal.id)
    serve_s = time.perf_counter() - began
    return {
        "root": root, "kill": kill, "steps": STEPS[kill], "removed": killer.removed if killer else None,
        "seconds": {"ingest": round(ingest_s, 1), "batch": round(batch_s, 1), "serve": round(serve_s, 1)},
        "ingest": {name: d["clips"] for name, d in ingested["datasets"].items()}, "ingest_commit": ingested["commit"],
        "counts": report["counts"], "moved": report["moved"], "report_uri": report["report"],
        "jobs": [{"name": j["name"], "job_id": j["job_id"], "state": j["state"], "resumed_from": j["resumed_from"], "moved": j["moved"],
                  "catalog_ids": j["catalog_ids"], "seconds": j["seconds"],
                  "attempts": [{"node": labels.get(a["node_id"], a["node_id"]), "resumed_from": a["resumed_from"]}
                               for a in j["attempts"]]} for j in report["jobs"]],
        "catalog": {"ids": sorted(e.id for e in entries), "steps": sorted({e.step for e in entries}),
                    "verified": verified},
        "serve": served,
    }


def main(argv: list[str]) -> None:
    work = Path(argv[0])
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOTIONDIRECTOR_CACHE", str(work / "cache"))  # resolved remote packages
    runs = [(arg.removesuffix(":kill"), arg.endswith(":kill")) for arg in argv[1:]]
    began = time.perf_counter()
    model = write_tiny_model(work / "tiny-model", seed=0)
    sources = write_sources(work / "sources")
    cluster, nodes = start_cluster()
    try:
        from ray import serve

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        start_s = time.perf_counter() - began
        labels = {node.node_id: name for name, node in nodes.items()}
        labels[ray.get_runtime_context().get_node_id()] = "head"
        results = [scenario(work, root, kill, model, sources, cluster, nodes, labels, port) for root, kill in runs]
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"startup_s": round(start_s, 1), "total_s": round(time.perf_counter() - began, 1),
                      "runs": results}))


if __name__ == "__main__":
    main(sys.argv[1:])
