"""Serve benchmark on loopback: latency and throughput, LoRA switches, batched vs one at a time.

    .venv/bin/python bench/serve.py                                   # toy model, prints the section
    nice -n 10 .venv/bin/python bench/serve.py --docs docs/benchmarks.md

Starts a local Ray cluster, a catalog of random LoRA packages for the base model in a temp folder
and the Serve app, then over HTTP on 127.0.0.1 (bounded: a fixed number of requests per level):
  - p50/p95 latency and throughput at client concurrency 1/4/8, all requests for one LoRA set
    (`?wait=true`: a request's latency is submit -> video done);
  - LoRA switch, one request at a time: the same set again (it stays applied to the UNet), alternating
    between two sets the replica holds ("cached": packages resolved, adapters re-injected at each
    switch) and sets never seen before ("cold": packages resolved from the catalog, hashes checked,
    adapters injected);
  - the same concurrency-8 load with `max_batch_size=1` (one at a time) against the batched app.
Generation settings are small (--steps, --frames) so the run stays a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

SECTION = "## Serve"
HERE = Path(__file__).resolve().parent


def random_package(backbone, folder: Path, kind: str, seed: int) -> Path:
    from motiondirector.lora.package import BaseModelRef, Manifest, write_package

    targets = backbone.temporal_lora_targets() if kind == "temporal" else backbone.spatial_lora_targets()
    modules = dict(backbone.unet.named_modules())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in targets:
        linear = modules[name]
        state[f"{name}.lora_A.weight"] = torch.randn(8, linear.in_features, generator=generator) / 8
        state[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, 8, generator=generator) * 0.1
    manifest = Manifest(kind=kind, base=BaseModelRef(model_id=backbone.model_id,
                                                     architecture=backbone.architecture_fingerprint),
                        rank=8, alpha=8, targets=targets)
    return write_package(folder, state, manifest)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies: list[float] = []

    def one(body: dict) -> None:
        started = time.perf_counter()
        response = http.post("/v1/generations", params={"wait": "true"}, json=body)
        if response.status_code != 200 or response.json()["status"] != "done":
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        latencies.append(time.perf_counter() - started)

    with httpx.Client(base_url=url, timeout=600) as http, ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        list(pool.map(one, bodies))
        seconds = time.perf_counter() - started
    return {"n": len(bodies), "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "throughput": len(bodies) / seconds, "seconds": seconds}


def run_burst(url: str, bodies: list[dict]) -> dict:
    """Submit every request at once (202, no waiting), then poll until all are done: queued-load throughput."""
    with httpx.Client(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        ids = []
        for body in bodies:
            response = http.post("/v1/generations", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
            ids.append(response.json()["id"])
        pending = set(ids)
        while pending:
            time.sleep(0.1)
            for job_id in list(pending):
                status = http.get(f"/v1/generations/{job_id}").json()["status"]
                if status == "failed":
                    raise RuntimeError(f"job {job_id} failed")
                if status == "done":
                    pending.discard(job_id)
        seconds = time.perf_counter() - started
    return {"n": len(bodies), "throughput": len(bodies) / seconds, "seconds": seconds}


def main() -> None:
    from serve.settings import ServeSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="toy")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (toy: 20)")
    parser.add_argument("--frames", type=int, default=None, help="default: the model's (toy: 8)")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--switches", type=int, default=6, help="requests per LoRA-switch case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the generator replica")
    parser.add_argument("--batch-wait", type=float, default=ServeSettings.model_fields["batch_wait_s"].default,
                        help="serve.batch window (s); default: the app's")
    parser.add_argument("--docs", type=Path, help="write the section into this benchmarks page")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from motiondirector import api
    from serve.app import application

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    catalog = api.open_catalog(str(work / "catalog"))
    backbone = api.load_backbone(args.base, "cpu")
    motions = [catalog.add(random_package(backbone, work / f"m{i}", "temporal", i), name=f"m{i}").id
               for i in range(2 + args.switches)]
    appearance = catalog.add(random_package(backbone, work / "a", "spatial", 99), name="a").id
    del backbone

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    base_settings = ServeSettings(base=args.base, catalog=catalog.uri, device="cpu", threads=args.threads,
                                  generator_cpus=1, queue_limit=256, max_batch_size=8,
                                  batch_wait_s=args.batch_wait, port=port)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def body(i: int, lora_ids: list[str]) -> dict:
        sampling = {key: value for key, value in (("steps", args.steps), ("frames", args.frames)) if value}
        return {"prompt": f"bench video {i}", "seed": i, **sampling,
                "motions": [{"lora_id": lora_id} for lora_id in lora_ids], "appearance": {"lora_id": appearance}}

    results: dict = {}
    try:
        for label, batch in (("batched", 8), ("one at a time", 1)):
            settings = base_settings.model_copy(update={"max_batch_size": batch})
            serve.run(application(settings), name="bench", route_prefix="/")
            run_load(url, [body(i, [motions[0]]) for i in range(2)], 1)  # warm-up: set loaded, kernels built
            levels = (1, 4, 8) if batch > 1 else (8,)
            generator = serve.get_deployment_handle("Generator", app_name="bench")
            for concurrency in levels:
                bodies = [body(i, [motions[0]]) for i in range(args.requests)]
                before = generator.stats.remote().result()
                results[(label, concurrency)] = run_load(url, bodies, concurrency)
                after = generator.stats.remote().result()
                results[(label, concurrency)]["batch"] = ((after["videos_sampled"] - before["videos_sampled"])
                                                          / max(1, after["sampler_calls"] - before["sampler_calls"]))
                print(label, concurrency, results[(label, concurrency)], flush=True)
            before = generator.stats.remote().result()
            results[(label, "burst")] = run_burst(url, [body(i, [motions[0]]) for i in range(args.requests)])
            after = generator.stats.remote().result()
            results[(label, "burst")]["batch"] = ((after["videos_sampled"] - before["videos_sampled"])
                                                  / max(1, after["sampler_calls"] - before["sampler_calls"]))
            print(label, "burst", results[(label, "burst")], flush=True)
            if batch > 1:
                held = [[motions[0]], [motions[1]]]
                run_load(url, [body(0, held[1])], 1)  # both sets now held by the replica
                same = [body(i, held[0]) for i in range(args.switches)]
                cached = [body(i, held[i % 2]) for i in range(args.switches)]
                cold = [body(i, [motions[2 + i]]) for i in range(args.switches)]
                results["same"] = run_load(url, same, 1)
                results["cached"] = run_load(url, cached, 1)
                results["cold"] = run_load(url, cold, 1)
                print("switch", results["same"], results["cached"], results["cold"], flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    load_end = os.getloadavg()[0]

    batched, single = results[("batched", 8)], results[("one at a time", 8)]
    lines = [
        SECTION, "",
        f"`{shlex.join(['python', 'bench/serve.py', *sys.argv[1:]])}`", "",
        f"Base `{args.base}` on cpu ({platform.machine()}, {os.cpu_count()} CPUs, generator replica with "
        f"{args.threads} torch thread), one generator replica; each request: one motion + one appearance LoRA, "
        f"{args.steps or 'the model default of'} DDIM steps, {args.frames or 'the default'} frames at the model's "
        f"default size, `?wait=true` over loopback "
        f"HTTP (latency = submit to finished mp4 + gif). {args.requests} requests per level, batch window "
        f"{base_settings.batch_wait_s} s.", "",
        "| app | client concurrency | p50 latency (s) | p95 latency (s) | throughput (videos/s) | videos per sampler call |",
        "|---|---|---|---|---|---|",
    ]
    for (label, concurrency), r in ((k, v) for k, v in results.items() if isinstance(k, tuple)):
        if concurrency == "burst":
            continue
        lines.append(f"| {label} (max_batch_size {8 if label == 'batched' else 1}) | {concurrency} | "
                     f"{r['p50']:.2f} | {r['p95']:.2f} | {r['throughput']:.2f} | {r['batch']:.1f} |")
    ratio = batched["throughput"] / single["throughput"]
    burst_b, burst_s = results[("batched", "burst")], results[("one at a time", "burst")]
    burst_ratio = burst_b["throughput"] / burst_s["throughput"]
    lines += ["", f"Batched vs one at a time, clients each waiting for their video (concurrency 8): "
                  f"**{ratio:.2f}×** the throughput (target ≥ 2×: {'met' if ratio >= 2 else 'NOT met'}).", "",
              f"The same {args.requests} requests submitted at once (202, then polled until all are done), so "
              "they queue at the generator:", "",
              "| app | throughput (videos/s) | videos per sampler call |", "|---|---|---|",
              f"| batched (max_batch_size 8) | {burst_b['throughput']:.2f} | {burst_b['batch']:.1f} |",
              f"| one at a time (max_batch_size 1) | {burst_s['throughput']:.2f} | {burst_s['batch']:.1f} |", "",
              f"Queued load: batched **{burst_ratio:.2f}×** the throughput of one at a time.", "",
              "LoRA switch, one request at a time (p50 / p95 latency, s):", "",
              "| case | p50 | p95 |", "|---|---|---|",
              f"| no switch: the same set again (still applied to the UNet) | {results['same']['p50']:.2f} | "
              f"{results['same']['p95']:.2f} |",
              f"| cached switch: alternating between two sets the replica holds (packages resolved, adapters "
              f"re-injected) | {results['cached']['p50']:.2f} | "
              f"{results['cached']['p95']:.2f} |",
              f"| cold: a set never seen (packages resolved, hash-checked, loaded) | {results['cold']['p50']:.2f} | "
              f"{results['cold']['p95']:.2f} |", "",
              f"Load average {load_start:.1f} at the start, {load_end:.1f} at the end, on {os.cpu_count()} CPUs "
              "shared with other jobs: absolute numbers move with it; the ratios were measured in one run.", ""]
    text = "\n".join(lines)
    print(text)
    if args.docs:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_report", HERE / "report.py")
        report = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(report)
        report.replace_section(args.docs, SECTION, text)


if __name__ == "__main__":
    # This file is bench/serve.py: drop bench/ from the path so `serve` is the application package.
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
    main()
