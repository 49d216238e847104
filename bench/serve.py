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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="toy")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--switches", type=int, default=6, help="requests per LoRA-switch case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the generator replica")
    parser.add_argument("--docs", type=Path, help="write the section into this benchmarks page")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from motiondirector import api
    from serve.app import application
    from serve.settings import ServeSettings

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
                                  generator_cpus=1, queue_limit=256, max_batch_size=8, batch_wait_s=0.05,
                                  port=port)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def body(i: int, lora_ids: list[str]) -> dict:
        return {"prompt": f"bench video {i}", "seed": i, "steps": args.steps, "frames": args.frames,
                "motions": [{"lora_id": lora_id} for lora_id in lora_ids], "appearance": {"lora_id": appearance}}

    results: dict = {}
    try:
        for label, batch in (("batched", 8), ("one at a time", 1)):
            settings = base_settings.model_copy(update={"max_batch_size": batch})
            serve.run(application(settings), name="bench", route_prefix="/")
            run_load(url, [body(i, [motions[0]]) for i in range(2)], 1)  # warm-up: set loaded, kernels built
            levels = (1, 4, 8) if batch > 1 else (8,)
            for concurrency in levels:
                bodies = [body(i, [motions[0]]) for i in range(args.requests)]
                results[(label, concurrency)] = run_load(url, bodies, concurrency)
                print(label, concurrency, results[(label, concurrency)], flush=True)
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
        f"{args.steps} DDIM steps, {args.frames} frames at the model's default size, `?wait=true` over loopback "
        f"HTTP (latency = submit to finished mp4 + gif). {args.requests} requests per level, batch window "
        f"{base_settings.batch_wait_s} s.", "",
        "| app | client concurrency | p50 latency (s) | p95 latency (s) | throughput (videos/s) |",
        "|---|---|---|---|---|",
    ]
    for (label, concurrency), r in ((k, v) for k, v in results.items() if isinstance(k, tuple)):
        lines.append(f"| {label} (max_batch_size {8 if label == 'batched' else 1}) | {concurrency} | "
                     f"{r['p50']:.2f} | {r['p95']:.2f} | {r['throughput']:.2f} |")
    ratio = batched["throughput"] / single["throughput"]
    lines += ["", f"Batched vs one at a time at concurrency 8: **{ratio:.2f}×** the throughput "
                  f"(target ≥ 2×: {'met' if ratio >= 2 else 'NOT met'}).", "",
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
        from report import replace_section

        replace_section(args.docs, SECTION, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
