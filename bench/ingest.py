"""Ingestion throughput: the Ray Data pipeline vs the single-process library loop on the same clips.

    .venv/bin/python bench/ingest.py                      # 64 generated videos, tiny model, 2 CPUs
    .venv/bin/python bench/ingest.py --videos 96 --size 64 --base DIR

Both sides get the same CPUs: the reference loop runs torch with --cpus threads; Ray gets
num_cpus=--cpus (one encoder actor with one thread + decode tasks on the rest). The loop is
`decode_item` then `encode_clips` in batches of --batch-size; it also runs with one torch thread,
whose decode/encode split is the per-core share of time in each.
Cluster start-up is excluded. Each Ray run also pays a fixed cost (planning pass, starting the
encoder actor and loading the model into it, while the first decodes already run), so the pipeline
is timed on two sizes in the same warm cluster: all videos and the first quarter of them. The
marginal rate, (clips_all - clips_quarter) / (seconds_all - seconds_quarter), is the steady
throughput; the fixed cost is what the quarter run took beyond it.
Prints a markdown section for docs/benchmarks.md.

Realistic per-clip work (`--vae full`): the tiny model's VAE is replaced by a random-init VAE of the
full SD/ZeroScope size (block_out_channels 128/256/512/512, 2 layers per block, 4 latent channels:
the same compute per frame as ZeroScope's), clips of 256x256x16. Encoding then costs tens of seconds
per clip on a CPU core, so the pipeline is timed end to end (fixed costs included) once per
`--settings` entry, all in one warm cluster, against the single-process loop:

    nice -n 10 .venv/bin/python bench/ingest.py --vae full --videos 8 --size 256 --loop-threads 2 \
        --settings 'encoders=1' 'encoders=1,encoder_threads=2' 'encoders=2,encoder_cpus=0.5,batch_size=2'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from motiondirector.backbones import load_backbone  # noqa: E402
from motiondirector.backbones.tiny import write_tiny_model  # noqa: E402
from motiondirector.data.encode import decode_item, encode_clips  # noqa: E402
from motiondirector.data.ingest_spec import IngestSpec  # noqa: E402
from motiondirector.data.sources import DatasetSpec, list_items  # noqa: E402
from motiondirector.video_io import write_video  # noqa: E402


def make_videos(folder: Path, count: int, size: int, frames: int, fps: int) -> Path:
    """Distinct videos of a drifting random texture (so every file has its own content hash)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        texture = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        clip = np.stack([np.roll(texture, 4 * k, axis=1) for k in range(frames)])
        write_video(clip, folder / f"video{index:03d}.mp4", fps=fps)
    return folder


# diffusers AutoencoderKL as in SD 1.x / ZeroScope's vae/config.json (random init: compute, not quality).
FULL_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
            "act_fn": "silu", "scaling_factor": 0.18215}


def write_full_vae_model(folder: Path) -> Path:
    """The tiny model folder with its VAE replaced by a full-size one (UNet and text encoder stay tiny:
    ingestion runs only the VAE encoder and the text encoder)."""
    model = write_tiny_model(folder)
    for old in (model / "vae").iterdir():
        old.unlink()
    torch.manual_seed(0)
    AutoencoderKL(**FULL_VAE).save_pretrained(model / "vae")
    return model


def parse_setting(text: str) -> dict[str, float | int]:
    """'encoders=2,encoder_cpus=0.5' -> IngestSpec fields (the pipeline knobs)."""
    allowed = {"encoders": int, "batch_size": int, "encoder_cpus": float, "encoder_threads": int,
               "decode_cpus": float, "files_per_decode_task": int}
    setting: dict[str, float | int] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in allowed:
            raise SystemExit(f"--settings: unknown knob {key!r} (known: {', '.join(allowed)})")
        setting[key] = allowed[key](value)
    return setting


def library_loop(base: str, spec: DatasetSpec, batch_size: int, threads: int) -> dict[str, float]:
    """The single-process path: decode every file, encode in batches. Model load not timed."""
    torch.set_num_threads(threads)
    backbone = load_backbone(base, "cpu")
    times = {"clips": 0, "decode_s": 0.0, "encode_s": 0.0}
    pending = []

    def encode_pending() -> None:
        started = time.perf_counter()
        times["clips"] += len(encode_clips(backbone, pending, batch_size))
        times["encode_s"] += time.perf_counter() - started
        pending.clear()

    for item in list_items(spec):
        started = time.perf_counter()
        pending += decode_item(item, spec)
        times["decode_s"] += time.perf_counter() - started
        if len(pending) >= batch_size:
            encode_pending()
    if pending:
        encode_pending()
    return {**times, "total_s": times["decode_s"] + times["encode_s"], "load": os.getloadavg()[0]}


def ray_run(base: str, spec: DatasetSpec, output: Path, batch_size: int, **knobs: float | int) -> dict[str, float]:
    from pipelines.ingest import run_ingest

    ingest = IngestSpec(output=str(output), base=base, device="cpu", **{"batch_size": batch_size, **knobs},
                        datasets=[spec.model_dump()])
    started = time.perf_counter()
    result = run_ingest(ingest)
    seconds = time.perf_counter() - started
    summary = result.datasets[spec.name]
    if summary.encoded != summary.clips or summary.rejected:
        raise RuntimeError(f"benchmark run did not encode every clip: {summary}")
    return {"clips": summary.clips, "total_s": seconds, "load": os.getloadavg()[0]}


def report(command: str, args: argparse.Namespace, loops: dict[int, dict[str, float]], quarter: dict[str, float],
           whole: dict[str, float]) -> str:
    loop_rate = loops[args.cpus]["clips"] / loops[args.cpus]["total_s"]
    marginal_rate = (whole["clips"] - quarter["clips"]) / (whole["total_s"] - quarter["total_s"])
    fixed = quarter["total_s"] - quarter["clips"] / marginal_rate
    rows = [f"| single-process loop (decode_item + encode_clips), {threads} torch thread(s) | {loop['clips']} | "
            f"{loop['total_s']:.1f} | {loop['clips'] / loop['total_s']:.2f} | "
            f"{loop['clips'] / loop['total_s'] / loop_rate:.2f}x |" for threads, loop in loops.items()]
    for label, run in (("first quarter of the videos", quarter), ("all videos", whole)):
        rate = run["clips"] / run["total_s"]
        rows.append(f"| Ray Data pipeline, {label} | {run['clips']} | {run['total_s']:.1f} | {rate:.2f} | "
                    f"{rate / loop_rate:.2f}x |")
    rows.append(f"| Ray Data pipeline, marginal (steady) rate | {whole['clips'] - quarter['clips']} | "
                f"{whole['total_s'] - quarter['total_s']:.1f} | {marginal_rate:.2f} | {marginal_rate / loop_rate:.2f}x |")
    single = loops[min(loops)]  # per-core costs: what one decode task and one encoder thread each take
    decode, encode = single["decode_s"] / single["clips"], single["encode_s"] / single["clips"]
    return "\n".join([
        "## Ingestion", "", f"`{command}`", "",
        f"{args.videos} generated videos ({args.source_size}x{args.source_size}, {args.source_frames} frames at "
        f"{args.source_fps} fps) -> one clip each: {args.frames} frames at 8 fps, {args.size}x{args.size}; "
        f"random-init tiny model (real UNet3D/VAE/CLIP architecture) on CPU, batch {args.batch_size}. "
        f"Ray gets num_cpus={args.cpus} (one single-threaded encoder actor + decode tasks); the reference loop "
        f"gets {args.cpus} torch threads ({platform.machine()}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end).", "",
        "| path | clips | seconds | clips/s | vs loop |", "|---|---|---|---|---|", *rows, "",
        f"Fixed cost per Ray run (planning pass, encoder actor start, model load): about {fixed:.1f} s. "
        f"Per clip on one thread ({min(loops)}-thread loop): decode {decode * 1000:.0f} ms "
        f"({single['decode_s'] / single['total_s']:.0%}), encode {encode * 1000:.0f} ms "
        f"({single['encode_s'] / single['total_s']:.0%}); with decode and encode overlapped on separate cores "
        f"the pipeline's steady rate is bounded by 1 / max(decode, encode) = {1 / max(decode, encode):.2f} clips/s.",
        ""])


def report_settings(command: str, args: argparse.Namespace, loops: dict[int, dict[str, float]],
                    runs: list[tuple[str, dict[str, float]]]) -> str:
    """The realistic-workload section: every pipeline setting end to end against the loop."""
    loop_threads = max(loops)
    loop = loops[loop_threads]
    loop_rate = loop["clips"] / loop["total_s"]
    rows = [f"| single-process loop (decode_item + encode_clips), {threads} torch thread(s), batch "
            f"{args.batch_size} | {run['clips']} | {run['total_s']:.1f} | {run['clips'] / run['total_s']:.3f} | "
            f"{run['clips'] / run['total_s'] / loop_rate:.2f}x | {run['load']:.1f} |" for threads, run in loops.items()]
    rows += [f"| Ray Data pipeline: {label} | {run['clips']} | {run['total_s']:.1f} | "
             f"{run['clips'] / run['total_s']:.3f} | {run['clips'] / run['total_s'] / loop_rate:.2f}x | {run['load']:.1f} |"
             for label, run in runs]
    if args.vae == "full":
        title = "## Ingestion at realistic per-clip work (full-size VAE)"
        model = ("the tiny test model with its VAE replaced by a random-init full-size SD/ZeroScope `AutoencoderKL` "
                 "(128/256/512/512 channels, 2 layers per block, 4 latent channels: ZeroScope's compute per frame)")
    else:
        title, model = "## Ingestion settings (tiny model)", "random-init tiny model"
    return "\n".join([
        title, "", f"`{command}`", "",
        f"{args.videos} generated videos ({args.source_size}x{args.source_size}, {args.source_frames} frames at "
        f"{args.source_fps} fps) -> one clip each: {args.frames} frames at 8 fps, {args.size}x{args.size}. Model: {model}, on CPU. "
        f"Ray gets num_cpus={args.cpus}; each Ray run is timed end to end in one warm cluster (planning, actor "
        f"start, model load included); the loop does not time its model load ({platform.machine()}, torch "
        f"{torch.__version__}; a shared machine: the last column is its 1-minute load average when each run "
        "ended)." + (" The loop row was measured by an earlier run of the same command and passed in with "
                     "--loop-result." if args.loop_result else ""), "",
        "| path | clips | seconds | clips/s | vs loop | load avg |", "|---|---|---|---|---|---|", *rows, "",
        f"Per clip in the {loop_threads}-thread loop: decode {loop['decode_s'] / loop['clips'] * 1000:.0f} ms, "
        f"encode {loop['encode_s'] / loop['clips']:.1f} s ({loop['encode_s'] / loop['total_s']:.1%} of the time). "
        "Settings are IngestSpec fields (docs/ingest.md): `encoders` actors, each reserving `encoder_cpus` "
        "and running `encoder_threads` torch threads; `files_per_decode_task`; `batch_size` clips per batch.",
        ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=384)
    parser.add_argument("--source-frames", type=int, default=48)
    parser.add_argument("--source-fps", type=int, default=24)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--base", help="model folder (default: a random-init tiny model)")
    parser.add_argument("--vae", choices=("tiny", "full"), default="tiny",
                        help="full: replace the tiny model's VAE by a full-size SD/ZeroScope one (realistic work)")
    parser.add_argument("--loop-threads", type=int, nargs="+", help="torch threads of the reference loop runs "
                        "(default: --cpus and 1)")
    parser.add_argument("--settings", nargs="+", help="pipeline settings to time end to end, e.g. "
                        "'encoders=2,encoder_cpus=0.5' (each one run of all videos); default: the quarter/whole "
                        "marginal-rate measurement with the spec defaults")
    parser.add_argument("--loop-result", help="JSON of a loop measurement of the same workload printed earlier on "
                        "stderr (`loops: {...}`, with double quotes): reuse it instead of running the loop again "
                        "(the report says so)")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the one-video warm-up run (with the "
                        "full VAE it costs a whole clip; the first setting then also pays worker start-up)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/ingest.py", *(sys.argv[1:] if argv is None else argv)])
    if args.settings:
        settings = [(text, parse_setting(text)) for text in args.settings]  # bad knobs fail before any work
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if args.vae == "full":
            base = str(write_full_vae_model(root / "model"))
        else:
            base = args.base or str(write_tiny_model(root / "model"))
        videos = make_videos(root / "videos", args.videos, args.source_size, args.source_frames, args.source_fps)
        spec = DatasetSpec(name="bench", sources=[str(videos)], caption="a texture drifts", frames=args.frames,
                           fps=8, size=(args.size, args.size))
        if args.loop_result:
            loops = {int(threads): run for threads, run in json.loads(args.loop_result).items()}
        else:
            loops = {threads: library_loop(base, spec, args.batch_size, threads)
                     for threads in dict.fromkeys(args.loop_threads or [args.cpus, 1])}
        print(f"loops: {loops}", file=sys.stderr, flush=True)

        import ray

        ray.init(address="local", num_cpus=args.cpus,  # never join another cluster on this machine
                 include_dashboard=False, log_to_driver=False)
        try:
            one = spec.model_copy(update={"name": "one", "sources": [str(videos / "video000.mp4")]})
            if not args.no_warm_up:
                ray_run(base, one, root / "warm-up", args.batch_size)  # starts and imports the worker processes
            if args.settings:
                runs = []
                for index, (text, knobs) in enumerate(settings):
                    batch_size = int(knobs.pop("batch_size", args.batch_size))
                    runs.append((text, ray_run(base, spec, root / f"setting{index}", batch_size, **knobs)))
                    print(f"ray {text}: {runs[-1]}", file=sys.stderr, flush=True)
                sys.stdout.write(report_settings(command, args, loops, runs))
                return 0
            first = sorted(videos.iterdir())[:max(1, args.videos // 4)]
            quarter = ray_run(base, spec.model_copy(update={"sources": [str(p) for p in first]}), root / "quarter",
                              args.batch_size)
            whole = ray_run(base, spec, root / "whole", args.batch_size)
        finally:
            ray.shutdown()
    print(f"ray: quarter {quarter}, whole {whole}", file=sys.stderr)
    sys.stdout.write(report(command, args, loops, quarter, whole))
    return 0


if __name__ == "__main__":
    sys.exit(main())
