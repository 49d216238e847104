"""Sampling time per video: no LoRA, an unfused temporal LoRA, the same LoRA fused. Median of several runs.

    .venv/bin/python bench/sample.py                      # random-init toy-sized model on CPU
    .venv/bin/python bench/sample.py --base DIR --device cuda --steps 30 --frames 16 --size 384

The three configurations run round-robin on two loads of the same base (the no-LoRA one never
sees a LoRA layer), from the same initial noise. With --docs the "## Sampling" section of
docs/benchmarks.md is replaced (or appended) with the command and the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import replace_section  # bench/ is on sys.path when run as a script

from motiondirector.backbones import load_backbone
from motiondirector.backbones.tiny import TinyModelConfig, write_tiny_model
from motiondirector.lora import inject
from motiondirector.lora.inject import LoraSettings
from motiondirector.lora.interop import plain_linears
from motiondirector.sample import SamplingSettings, latent_shape, sample_videos

SECTION = "## Sampling"


def preset_config(name: str) -> TinyModelConfig:
    if name == "tiny":
        return TinyModelConfig()
    from motiondirector.toyworld.pretrain import toy_model_config

    return toy_model_config()


def add_random_temporal_lora(backbone, rank: int, seed: int = 0) -> str:
    """A temporal adapter with non-zero up weights (a fresh one would be an exact no-op)."""
    inject.add_adapter(backbone.unet, "motion_0", backbone.temporal_lora_targets(),
                       LoraSettings(rank=rank, dropout=0.0), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in inject.adapter_parameters(backbone.unet, "motion_0"):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return "motion_0"


def time_video(backbone, settings: SamplingSettings, noise: torch.Tensor) -> float:
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    sample_videos(backbone, ["a red car running on the road"], settings, initial_noise=noise)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def lora_flop_share(backbone, rank: int) -> float:
    """Extra multiply-adds of rank-`rank` LoRAs relative to the temporal Linears they adapt: r(in+out)/(in·out)."""
    modules = dict(backbone.unet.named_modules())
    linears = [modules[name] for name in backbone.temporal_lora_targets()]
    return (sum(rank * (m.in_features + m.out_features) for m in linears)
            / sum(m.in_features * m.out_features for m in linears))


def run(base: str, device: str, settings: SamplingSettings, rank: int,
        repeats: int) -> tuple[dict[str, list[float]], float]:
    plain = load_backbone(base, device)
    flop_share = lora_flop_share(plain, rank)
    adapted = load_backbone(base, device)
    name = add_random_temporal_lora(adapted, rank)
    noise = torch.randn(latent_shape(plain, settings, 1), generator=torch.Generator().manual_seed(0))

    def unfused() -> float:
        with inject.active(adapted.unet, [name]):
            return time_video(adapted, settings, noise)

    def fused() -> float:  # as `generate --fuse`: folded weights, LoRA layers swapped out
        with inject.active(adapted.unet, [name]):
            inject.fuse(adapted.unet, [name])
            try:
                with plain_linears(adapted.unet):
                    return time_video(adapted, settings, noise)
            finally:
                inject.unfuse(adapted.unet)

    configs = {"no LoRA": lambda: time_video(plain, settings, noise), "temporal LoRA, unfused": unfused,
               "temporal LoRA, fused": fused}
    for measure in configs.values():  # warm-up: allocator, kernels, first-call caches
        measure()
    timings: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(repeats):
        for label, measure in configs.items():
            timings[label].append(measure())
    return timings, flop_share


def report(timings: dict[str, list[float]], command: str, settings: SamplingSettings, base: str, device: str,
           rank: int, flop_share: float) -> str:
    reference = statistics.median(timings["no LoRA"])
    lines = [SECTION, "", f"`{command}`", "",
             f"Base `{base}` on {device} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}); {settings.steps} DDIM steps, "
             f"guidance {settings.guidance:g}, {settings.frames} frames, {settings.height}x{settings.width}, "
             f"temporal LoRA rank {rank}; median of {len(timings['no LoRA'])} runs per video. At this rank the "
             f"LoRAs add {flop_share:.0%} to the multiply-adds of the temporal Linears they adapt (the overhead "
             "scales with that share: small for full-size models, large for narrow toy ones).", "",
             "| configuration | seconds per video (median) | min | max | vs no LoRA |",
             "|---|---|---|---|---|"]
    for label, values in timings.items():
        median = statistics.median(values)
        lines.append(f"| {label} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | "
                     f"{(median / reference - 1) * 100:+.1f}% |")
    # Other work on the machine widens min..max; the load says how much there was.
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="model to time (default: a random-init model of --preset's size)")
    parser.add_argument("--preset", choices=("toy", "tiny"), default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=12.0)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--docs", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SamplingSettings(steps=args.steps, guidance=args.guidance, frames=args.frames, height=args.size,
                                width=args.size)
    command = shlex.join(["python", "bench/sample.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as scratch:
        base = args.base or str(write_tiny_model(Path(scratch) / args.preset, preset_config(args.preset)))
        timings, flop_share = run(base, args.device, settings, args.rank, args.repeats)
    label = args.base or f"random-init {args.preset}-sized model"
    section = report(timings, command, settings, label, args.device, args.rank, flop_share)
    sys.stdout.write(section)
    if args.docs:
        replace_section(args.docs, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
