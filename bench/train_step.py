"""Dual-path training step: median step time and peak memory (RSS on CPU, VRAM on GPU), MFU on GPU.

    .venv/bin/python bench/train_step.py                          # (a) tiny, CPU; (b) if a GPU is present
    .venv/bin/python bench/train_step.py --setup full --steps 10  # (b) only
    .venv/bin/python bench/train_step.py --docs docs/benchmarks.md

(a) `tiny`: configs/tiny_car_turn.yaml on the tiny random model (rank 4, 4 frames, 32×32, fp32, CPU).
(b) `full`: the default `UNet3DConditionModel()` config (ModelScope, ~1.41 B params) with random
    weights, 16 frames at 384×384 (48×48 latents), rank 32, bf16 autocast + bf16 frozen weights,
    gradient checkpointing (the paper reports 14 GB): GPU only, skipped with a message otherwise.
Both run the real loop (`train`) on random cache records, with the spatial-skip probability set to 0
so every timed step runs both paths; the first --warmup steps are not timed. Model FLOPs of one
step (forward + backward of both paths, frozen weights get no weight gradients) are counted with
torch's FlopCounterMode on a step WITHOUT gradient checkpointing (its recomputation is not model
work); MFU = model FLOPs / median step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import replace_section  # bench/ is on sys.path when run as a script

from motiondirector.backbones.tiny import TinyModelConfig, build_components, write_tiny_model
from motiondirector.backbones.unet3d import UNet3DSpec
from motiondirector.config import TrainConfig, load_config
from motiondirector.events import TrainStep
from motiondirector.train.loop import train
from motiondirector.train.synthetic import synthetic_records

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training step"
# Dense bf16 peak (no sparsity) by device name fragment, FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def tiny_setup(tmp: Path) -> tuple[TrainConfig, UNet3DSpec, list]:
    from motiondirector.backbones import load_backbone

    model = write_tiny_model(tmp / "tiny-model")
    config = load_config(ROOT / "configs" / "tiny_car_turn.yaml", [f"base={model}", "validation.every=0"])
    backbone = load_backbone(str(model), "cpu")
    factor = 2 ** (len(backbone.vae.config.block_out_channels) - 1)  # pixels per latent
    records = synthetic_records(backbone, frames=config.data.frames,
                                latent_size=(config.data.size[0] // factor, config.data.size[1] // factor))
    return config, backbone, records


def full_setup(tmp: Path, device: str = "cuda", frames: int = 16,
               latent_size: tuple[int, int] = (48, 48)) -> tuple[TrainConfig, UNet3DSpec, list]:
    """The default UNet3D config with random weights; tiny VAE/text encoder (the step never runs them)."""
    from diffusers import UNet3DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = torch.device(device)
    parts = build_components(TinyModelConfig(max_tokens=77))
    with device:
        unet = UNet3DConditionModel().to(torch.bfloat16)
    unet.set_attn_processor(AttnProcessor2_0())
    backbone = UNet3DSpec(unet=unet, vae=parts["vae"].to(device), text_encoder=parts["text_encoder"].to(device),
                          tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
                          model_id="random:UNet3DConditionModel()")
    config = TrainConfig.model_validate({
        "base": backbone.model_id, "device": str(device), "lora": {"rank": 32}, "mixed_precision": "bf16",
        "gradient_checkpointing": True, "checkpoint_every": 0, "validation": {"every": 0},
        "data": {"sources": ["random"], "frames": frames, "size": [8 * latent_size[0], 8 * latent_size[1]]}})
    records = synthetic_records(backbone, frames=frames, latent_size=latent_size)
    return config, backbone, records


def step_flops(config: TrainConfig, backbone, records, out: Path) -> float | None:
    """Model FLOPs of one dual-path step; must run before any checkpointed run (its wrappers persist)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            train(config.model_copy(update={"steps": 1, "gradient_checkpointing": False}), out, backbone=backbone,
                  records=records)
    except torch.cuda.OutOfMemoryError:
        print("FLOP count skipped: one step without gradient checkpointing does not fit", file=sys.stderr)
        return None
    finally:
        torch.cuda.empty_cache()
    return float(counter.get_total_flops())


def measure(name: str, config: TrainConfig, backbone, records, steps: int, warmup: int, tmp: Path) -> dict:
    config = config.model_copy(update={"steps": warmup + steps, "spatial_skip_probability": 0.0, "log_every": 1})
    cuda = backbone.device.type == "cuda"
    flops = step_flops(config, backbone, records, tmp / f"{name}-flops") if cuda else None
    stamps: list[float] = []

    def on_step(event) -> None:
        if isinstance(event, TrainStep):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    train(config, tmp / f"{name}-run", backbone=backbone, records=records, observers=[on_step])
    intervals = [b - a for a, b in zip([began, *stamps[:-1]], stamps, strict=True)][warmup:]
    result = {
        "setup": name, "device": torch.cuda.get_device_name() if cuda else cpu_name(),
        "threads": torch.get_num_threads(), "steps": steps, "median_step_s": statistics.median(intervals),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "unet_params": sum(p.numel() for p in backbone.unet.parameters() if not p.requires_grad),
        "load_average": os.getloadavg()[0],  # other work on the machine skews CPU timings
    }
    if cuda:
        result["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if flops is not None:
        result["tflop_per_step"] = flops / 1e12
        result["achieved_tflops"] = flops / result["median_step_s"] / 1e12
        peak = next((v for k, v in PEAK_BF16.items() if k in result["device"]), None)
        result["mfu"] = flops / result["median_step_s"] / peak if peak else None
    return result


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def render(results: list[dict], skipped: list[str], command: str) -> str:
    lines = [SECTION, "", f"`{command}`", "",
             "Dual-path step (spatial path on one frame + temporal path on the clip, both backward passes "
             "and both optimizer steps) through `motiondirector.train.loop.train`, spatial-skip probability 0, "
             "median over the timed steps after warm-up. Peak RSS is the whole process's (model build "
             "included); load avg is the machine's 1-minute load when the timing ended.", "",
             "| setup | device | threads | load avg | median step | peak memory | model FLOPs / step | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        memory = (f"{r['peak_vram_gib']:.1f} GiB VRAM" if "peak_vram_gib" in r
                  else f"{r['peak_rss_gib']:.2f} GiB RSS")
        flops = f"{r['tflop_per_step']:.1f} TFLOP" if "tflop_per_step" in r else "n/a (CPU)"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {r['setup']} ({r['unet_params'] / 1e6:.1f} M UNet params) | {r['device']} | "
                     f"{r['threads']} | {r['load_average']:.1f} | {r['median_step_s'] * 1000:.0f} ms | {memory} | "
                     f"{flops} | {mfu} |")
    lines += [""] + [f"- {line}" for line in skipped]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("all", "tiny", "full"), default="all")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--docs", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench/train_step.py", *(argv if argv is not None else sys.argv[1:])])
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.setup in ("all", "tiny"):
            results.append(measure("tiny", *tiny_setup(tmp), args.steps, args.warmup, tmp))
        if args.setup in ("all", "full"):
            if torch.cuda.is_available():
                results.append(measure("full", *full_setup(tmp), args.steps, args.warmup, tmp))
            else:
                skipped.append("full (default UNet3D config, 384×384×16, bf16): skipped, no GPU on this machine")
    for line in skipped:
        print(line, file=sys.stderr)
    section = render(results, skipped, command)
    print(section)
    if args.docs:
        replace_section(args.docs, SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
