"""Batch training on Ray: per-job overhead of Ray Train (+DeepSpeed) over the plain library loop, and jobs/hour
with 1 vs 2 concurrent jobs on a local cluster.

    nice -n 10 .venv/bin/python bench/train_batch.py --steps 60 --jobs 4 --docs docs/benchmarks.md

Setup: the tiny random model (configs/tiny_car_turn.yaml settings: rank 4, 4 frames, 32x32, fp32, CPU),
two datasets ingested with `pipelines.ingest.run_ingest` on the same local cluster
(`ray.init(num_cpus=--cpus)`), checkpoints every 20 steps, a preview gif at the end, registration
in a fresh catalog.
- plain: a fresh process running `api.train_and_register` (imports, model load, training,
  registration), timed from process start to exit, with `engine.kind` torch and deepspeed;
- ray: the same job as a one-job batch (`run_batch`; the job's wall time from its Ray task: trainer
  set-up, worker start, imports, model load, training, checkpoint reports, registration);
- jobs/hour: --jobs jobs of --steps steps, `max_concurrent` 1 and 2, one CPU per job.
GPU rows (jobs packed per GPU, peak VRAM) need a GPU and are not measured by this script on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from report import replace_section  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Batch training (Ray Train)"

PLAIN = """
import json, sys, time
from motiondirector import api
config = api.validate_config(json.loads(sys.argv[1]), "bench")
api.train_and_register(config, sys.argv[2], sys.argv[3], name="plain")
"""


def loadavg() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def make_ingest(folder: Path, model: Path) -> Path:
    from motiondirector.api import load_ingest_spec
    from motiondirector.video_io import write_video
    from pipelines.ingest import run_ingest

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (folder / "videos" / name).mkdir(parents=True)
        for index in range(2):
            write_video(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                        folder / "videos" / name / f"clip{index}.mp4", fps=8)
    spec = {"output": str(folder / "ingest"), "base": str(model), "device": "cpu", "batch_size": 2,
            "datasets": [{"name": name, "sources": str(folder / "videos" / name), "caption": f"clip {name}",
                          "frames": 4, "fps": 8, "size": [32, 32]} for name in ("a", "b")]}
    (folder / "ingest.yaml").write_text(yaml.safe_dump(spec))
    run_ingest(load_ingest_spec(folder / "ingest.yaml"))
    return folder / "ingest"


def job_defaults(model: Path, steps: int, engine: str) -> dict:
    return {"base": str(model), "device": "cpu", "steps": steps, "lora": {"rank": 4}, "mixed_precision": "no",
            "gradient_checkpointing": False, "checkpoint_every": 20,
            "validation": {"steps": 2, "frames": 4, "size": [32, 32]}, "engine": {"kind": engine}}


def plain_seconds(config: dict, folder: Path) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN, json.dumps(config), str(folder / "run"), str(folder / "catalog")],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return time.perf_counter() - began


def batch(folder: Path, defaults: dict, jobs: list[dict], max_concurrent: int) -> tuple[dict, float]:
    from pipelines.batch_spec import load_batch_spec
    from pipelines.train_batch import run_batch

    folder.mkdir(parents=True)
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({"storage": "storage", "catalog": "catalog", "defaults": defaults,
                                    "resources": {"cpus_per_job": 1, "max_concurrent": max_concurrent},
                                    "jobs": jobs}))
    began = time.perf_counter()
    report = run_batch(load_batch_spec(spec))
    wall = time.perf_counter() - began
    failed = [j for j in report["jobs"] if j["state"] != "done"]
    if failed:
        raise SystemExit(f"batch failed: {failed}")
    return report, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--docs", type=Path, default=None, help="write the section into this markdown page")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from motiondirector.backbones.tiny import write_tiny_model

    load_before = loadavg()
    rows, throughput = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "tiny-model")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ingest = make_ingest(tmp / "data", model)
        dataset = f"{ingest}#a"
        for engine in ("torch", "deepspeed"):
            defaults = job_defaults(model, args.steps, engine)
            config = {**defaults, "data": {"dataset": dataset}}
            plain = plain_seconds(config, tmp / f"plain-{engine}")
            report, _ = batch(tmp / f"ray-{engine}", defaults, [{"name": "one", "dataset": dataset}], 1)
            ray_seconds = report["jobs"][0]["seconds"]
            rows.append((engine, plain, ray_seconds))
            print(f"{engine}: plain {plain:.1f} s, ray {ray_seconds:.1f} s ({ray_seconds / plain:.2f}x)", flush=True)
        defaults = job_defaults(model, args.steps, "torch")
        jobs = [{"name": f"j{i}", "dataset": f"{ingest}#{'ab'[i % 2]}"} for i in range(args.jobs)]
        for concurrent in (1, 2):
            _, wall = batch(tmp / f"throughput-{concurrent}", defaults, jobs, concurrent)
            throughput.append((concurrent, wall, args.jobs * 3600 / wall))
            print(f"max_concurrent {concurrent}: {args.jobs} jobs in {wall:.1f} s = {args.jobs * 3600 / wall:.0f} "
                  "jobs/hour", flush=True)
        ray.shutdown()
    load_after = loadavg()
    command = "nice -n 10 .venv/bin/python bench/train_batch.py " + shlex.join(
        [f"--steps={args.steps}", f"--jobs={args.jobs}", f"--cpus={args.cpus}"])
    lines = [SECTION, "",
             f"`{command}` on {platform.machine()} with {os.cpu_count()} CPU cores, a local Ray cluster of "
             f"{args.cpus} CPUs; load average (1/5/15 min) {load_before} before and {load_after} after "
             "(the machine is shared, so absolute times are noisy). Tiny random model, rank 4, 4 frames at "
             f"32x32, {args.steps} steps, checkpoint every 20 steps, a preview gif, catalog registration.", "",
             "Per job: the plain library loop in a fresh process vs the same job as a Ray Train V2 "
             "TorchTrainer run (one worker):", "",
             "| engine | plain process (s) | Ray Train job (s) | ratio |", "|---|---|---|---|"]
    lines += [f"| {engine} | {plain:.1f} | {ray_s:.1f} | {ray_s / plain:.2f}x |" for engine, plain, ray_s in rows]
    lines += ["", f"Throughput, {args.jobs} jobs of {args.steps} steps, one CPU each:", "",
              "| max_concurrent | wall (s) | jobs/hour |", "|---|---|---|"]
    lines += [f"| {c} | {wall:.1f} | {rate:.0f} |" for c, wall, rate in throughput]
    lines += ["", "GPU rows (toy-sized and full-size jobs with 1, 2, 4 jobs packed per GPU via `gpus_per_job`, "
              "peak VRAM per job): not measured — no GPU was available to this run.", ""]
    body = "\n".join(lines)
    print(body)
    if args.docs:
        replace_section(args.docs, SECTION, body)


if __name__ == "__main__":
    main()
