"""`motiondirector toyworld ...`: render reference clips, pretrain the embedded `toy` model, report, benchmark."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from motiondirector.commands.common import DeviceOption, JsonOption, console, print_json, reported_errors

app = typer.Typer(no_args_is_help=True, help="The synthetic toy world: reference clips, the embedded `toy` "
                                             "model, its quality report and the Table-1 benchmark.")

SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the clip's start position, size and phase.")]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


@app.command("render")
def render_command(
    prompt: Annotated[str, typer.Option("--prompt", help='e.g. "a red square moving left on a grey background"')],
    out: Annotated[Path, typer.Option("--out", help="Output video (.mp4 or .gif).")],
    frames: Annotated[int, typer.Option("--frames", min=1)] = 8,
    size: Annotated[int, typer.Option("--size", min=8, help="Frame side in pixels.")] = 32,
    seed: SeedOption = 0,
    fps: Annotated[float, typer.Option("--fps", min=0.1)] = 8.0,
    as_json: JsonOption = False,
) -> None:
    """Render a ground-truth clip of the toy world from a caption."""
    from motiondirector.api import write_gif, write_video
    from motiondirector.toyworld.render import parse_caption, render

    with reported_errors():
        if out.suffix.lower() not in (".mp4", ".gif"):
            raise ValueError(f"--out {out}: expected a .mp4 or .gif file name")
        clip = render(parse_caption(prompt), frames=frames, size=size, seed=seed)
        (write_gif if out.suffix.lower() == ".gif" else write_video)(clip.frames, out, fps=fps)
    result = {"path": str(out), "caption": clip.caption, "seed": seed, "frames": frames, "size": size,
              "trajectory": [dict(zip(("x", "y", "area"), map(float, row), strict=True)) for row in clip.trajectory]}
    if as_json:
        print_json(result)
    else:
        console.print(f"wrote {out}: {clip.caption} ({frames} frames, {size}x{size}, seed {seed})")


def _motion_weights(values: list[str]) -> tuple[tuple[str, float], ...]:
    pairs = []
    for value in values:
        motion, _, weight = value.partition("=")
        try:
            pairs.append((motion.strip(), float(weight)))
        except ValueError:
            raise typer.BadParameter(f"{value!r}: expected MOTION=WEIGHT, e.g. left=3",
                                     param_hint="--motion-weight") from None
    return tuple(pairs)


@app.command("pretrain")
def pretrain_command(
    out: Annotated[Path, typer.Option("--out", help="Work folder: latent pool, checkpoints, logs.")],
    minutes: Annotated[float, typer.Option("--minutes", min=0.0, help="Denoiser training time in this run.")] = 60.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop at this step (of the stage).")] = None,
    export: Annotated[Path | None, typer.Option(
        "--export", help="Where the diffusers folder goes; default: the embedded `toy` model folder.")] = None,
    stage: Annotated[str, typer.Option(
        "--stage", help="zero-snr: continue a model folder's weights on the zero-terminal-SNR v-prediction "
                        "schedule (how the shipped model is built); scratch: the v1 epsilon recipe from random "
                        "weights (autoencoder, pool, denoiser).")] = "zero-snr",
    init: Annotated[Path | None, typer.Option(
        "--init", help="zero-snr stage: model folder to warm-start from (default: the embedded `toy` model; a "
                       "zero-SNR export continues its recorded step count).")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch.")] = 2,
    export_minutes: Annotated[float, typer.Option(
        "--export-minutes", min=0.0, help="zero-snr stage: also export every this many minutes (0: at the end).")] = 0.0,
    high_noise_share: Annotated[float, typer.Option(
        "--high-noise-share", min=0.0, max=1.0,
        help="Share of each batch drawn from the noisier half of the timesteps.")] = 0.5,
    high_noise_weight: Annotated[float, typer.Option(
        "--high-noise-weight", min=1.0, help="scratch stage: cap of the extra loss weight 1/SNR at high noise.")] = 10.0,
    text_lr_scale: Annotated[float, typer.Option(
        "--text-lr-scale", min=0.0, help="zero-snr stage: the text encoder learns at lr × this.")] = 1.0,
    motion_weight: Annotated[list[str] | None, typer.Option(
        "--motion-weight", help="zero-snr stage: MOTION=W draws that motion's clips W times as often; repeat.")] = None,
    separate_motion_words: Annotated[float, typer.Option(
        "--separate-motion-words", min=0.0,
        help="zero-snr stage, at a warm start: move the motion words' embeddings until captions differing only "
             "in the motion are this far apart in text features (L2; 0: off).")] = 0.0,
) -> None:
    """Pretrain the toy base model; resumable in chunks (see docs/toyworld.md for the shipped recipe)."""
    from dataclasses import replace

    from motiondirector.toyworld.pretrain import (
        EMBEDDED_MODEL_FOLDER,
        PretrainSettings,
        ZeroSnrSettings,
        pretrain,
        zero_snr_pretrain,
    )

    with reported_errors(), _progress() as progress:
        if stage not in ("zero-snr", "scratch"):
            raise ValueError(f"--stage {stage!r}: expected zero-snr or scratch")
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                unit = " (seconds)" if stage == "denoiser" else ""
                tasks[stage] = progress.add_task(stage + unit, total=total)
            progress.update(tasks[stage], completed=done)

        common = {"minutes": minutes, "resume": resume, "max_steps": max_steps,
                  "export_to": export or EMBEDDED_MODEL_FOLDER,
                  "echo": lambda message: console.print(message, highlight=False), "on_progress": on_progress}
        if stage == "zero-snr":
            recipe = zero_snr_pretrain(out, init=init or EMBEDDED_MODEL_FOLDER, **common, settings=replace(
                ZeroSnrSettings(), threads=threads, high_noise_share=high_noise_share, export_minutes=export_minutes,
                motion_weights=_motion_weights(motion_weight or []), text_lr_scale=text_lr_scale,
                separate_motion_words=separate_motion_words))
        else:
            recipe = pretrain(out, **common, settings=replace(
                PretrainSettings(), threads=threads, high_noise_share=high_noise_share,
                high_noise_weight=high_noise_weight))
    console.print(f"exported step {recipe['denoiser_steps']} to {export or EMBEDDED_MODEL_FOLDER}")


@app.command("report")
def report_command(
    base: Annotated[str, typer.Option("--base", help="Model to evaluate.")] = "toy",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="Pairs for the pretraining motions.")] = 64,
    held_out_prompts: Annotated[int, typer.Option("--held-out-prompts", min=1)] = 16,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0)] = 6.0,
    steps: Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for report.json, report.md and a grid.")] = None,
    docs: Annotated[Path | None, typer.Option(
        "--docs", help="Also replace the report section of this markdown file (docs/toyworld.md).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Base-model quality: colour/shape/background accuracy and motion fidelity on unseen prompt/seed pairs."""
    import json
    from dataclasses import replace

    import torch

    from motiondirector.api import atomic_write, load_backbone, write_grid_png
    from motiondirector.toyworld.evaluate import (
        TOY_SAMPLING,
        base_quality_report,
        replace_docs_section,
        report_markdown,
    )

    with reported_errors(), _progress() as progress:
        backbone = load_backbone(base, device)
        task = progress.add_task("sampling", total=prompts + held_out_prompts)
        report = base_quality_report(backbone, prompts=prompts, held_out_prompts=held_out_prompts, seed=seed,
                                     settings=replace(TOY_SAMPLING, guidance=guidance, steps=steps),
                                     on_batch=lambda done, total: progress.update(task, completed=done))
        markdown = report_markdown(report, _invocation("report"))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            samples = report.pop("samples")
            atomic_write(out / "report.md", markdown.encode())
            atomic_write(out / "report.json", json.dumps(report, indent=2, default=str).encode())
            first = torch.stack([s.frames for s in samples[:16]])
            write_grid_png(first.reshape(-1, *first.shape[2:]), out / "samples.png", columns=first.shape[1])
        if docs is not None:
            replace_docs_section(docs, "report", markdown)
    report.pop("samples", None)
    if as_json:
        print_json(report)
    else:
        sys.stdout.write(markdown)


@app.command("benchmark")
def benchmark_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for runs, benchmark.json/.md, grids and gifs.")],
    base: Annotated[str, typer.Option("--base", help="Base model.")] = "toy",
    motion: Annotated[str, typer.Option("--motion", help="Motion of the reference clips.")] = "zigzag",
    reference: Annotated[str, typer.Option("--reference", help="Appearance of the reference clips.")] = (
        "red circle on grey"),
    videos: Annotated[list[int] | None, typer.Option(
        "--videos", min=1, help="Reference clips per setting; repeat for several settings (default: 1 and 3).")] = None,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="Prompts asking for other appearances.")] = 8,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per prompt.")] = 4,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps per mode.")] = 150,
    rank: Annotated[int, typer.Option("--rank", min=1)] = 16,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-3,
    beta: Annotated[float, typer.Option("--beta", min=0.0, help="AD-loss beta.")] = 1.0,
    high_share: Annotated[float | None, typer.Option("--high-share", min=0.0, max=1.0, help=(
        "Share of LoRA training steps drawing t from [--high-from, T) (config timesteps.high_share; "
        "default: the base model's, 0.5 at zero terminal SNR)."))] = None,
    high_from: Annotated[int, typer.Option("--high-from", min=0)] = 800,
    multi_video_appearance: Annotated[str, typer.Option(
        "--multi-video-appearance", help=(
            "same: several videos are the reference look with other seeds; varied: each video another look "
            "(none of them among the prompts); colour, shape, background: each extra video changes only that "
            "attribute of the reference; one-factor: one attribute at a time, in turn; colour-background: the "
            "reference's shape in the other colour and background pairs (12 videos: all of them)."))] = "same",
    modes: Annotated[list[str] | None, typer.Option(
        "--modes", help="Modes to run, in this order; repeat (default: base coupled dual_path_no_ad dual_path).")] = None,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0)] = 6.0,
    sampling_steps: Annotated[int, typer.Option("--sampling-steps", min=1)] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    training_runs: Annotated[int, typer.Option("--training-runs", min=1, help=(
        "LoRAs trained per setting and mode (seeds --seed, --seed+1, ...), their samples pooled in one row, so "
        "the CI covers the spread between training runs."))] = 1,
    docs: Annotated[Path | None, typer.Option(
        "--docs", help="Also replace the benchmark section of this markdown file (docs/toyworld.md).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Table 1 in the toy world: base, coupled, dual_path_no_ad and dual_path on a held-out motion."""
    from dataclasses import replace

    from motiondirector.api import load_backbone
    from motiondirector.toyworld.benchmark import BenchmarkSettings, run_benchmark, table_markdown
    from motiondirector.toyworld.evaluate import TOY_SAMPLING, replace_docs_section

    with reported_errors():
        settings = BenchmarkSettings(
            motion=motion, reference=reference, videos=tuple(videos or (1, 3)), prompts=prompts, seeds=seeds,
            steps=steps, rank=rank, lr=lr, ad_beta=beta, high_share=high_share, high_from=high_from,
            multi_video_appearance=multi_video_appearance, seed=seed, training_runs=training_runs,
            **({"modes": tuple(modes)} if modes else {}),
            sampling=replace(TOY_SAMPLING, guidance=guidance, steps=sampling_steps))
        backbone = load_backbone(base, device)
        result = run_benchmark(backbone, settings, out,
                               on_stage=lambda stage: console.print(f"benchmark: {stage}", highlight=False))
        markdown = f"Command: `{_invocation('benchmark')}`\n\n" + table_markdown(result)
        if docs is not None:
            replace_docs_section(docs, "benchmark", markdown)
    if as_json:
        print_json(result)
    else:
        sys.stdout.write(markdown)
        console.print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'}, grids and gifs in {out}")


@app.command("diagnose")
def diagnose_command(
    base: Annotated[str, typer.Option("--base", help="Model to diagnose.")] = "toy",
    probes: Annotated[list[str] | None, typer.Option(
        "--probe", help="leak, accuracy or steer; repeat for several (default: all three).")] = None,
    leak_clips: Annotated[int, typer.Option("--leak-clips", min=1, help="(a) noised clips.")] = 32,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="(b) seeds per directional motion.")] = 32,
    steer_seeds: Annotated[int, typer.Option("--steer-seeds", min=1, help="(c) seeds, base and LoRA.")] = 32,
    steer_prompt: Annotated[str, typer.Option("--steer-prompt", help="(c) the training clip's caption.")] = (
        "a red circle moving right on a grey background"),
    steer_mode: Annotated[str, typer.Option("--steer-mode", help="(c) coupled or dual_path.")] = "dual_path",
    steer_steps: Annotated[int, typer.Option("--steer-steps", min=1, help="(c) LoRA training steps.")] = 300,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0)] = 6.0,
    steps: Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for diagnose.json/.md, a grid and the LoRA run (default: a temporary folder).")] = None,
    docs: Annotated[Path | None, typer.Option(
        "--docs", help="Also replace the diagnose section of this markdown file (docs/toyworld.md).")] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Does the base's motion follow the words? Direction leak, direction accuracy, LoRA steerability."""
    import json
    import tempfile
    from dataclasses import replace

    from motiondirector.api import atomic_write, load_backbone, write_grid_png
    from motiondirector.toyworld.diagnose import (
        DiagnoseSettings,
        diagnose,
        diagnose_markdown,
        grid_rows,
        without_samples,
    )
    from motiondirector.toyworld.evaluate import TOY_SAMPLING, replace_docs_section

    with reported_errors(), tempfile.TemporaryDirectory(prefix="toyworld-diagnose-") as scratch:
        chosen = tuple(dict.fromkeys(probes or ("leak", "accuracy", "steer")))
        unknown = [p for p in chosen if p not in ("leak", "accuracy", "steer")]
        if unknown:
            raise ValueError(f"--probe {', '.join(unknown)}: expected leak, accuracy or steer")
        if steer_mode not in ("coupled", "dual_path", "dual_path_no_ad"):
            raise ValueError(f"--steer-mode {steer_mode!r}: expected coupled, dual_path or dual_path_no_ad")
        settings = DiagnoseSettings(leak_clips=leak_clips, seeds=seeds, steer_seeds=steer_seeds,
                                    steer_prompt=steer_prompt, steer_mode=steer_mode, steer_steps=steer_steps,
                                    seed=seed, sampling=replace(TOY_SAMPLING, guidance=guidance, steps=steps))
        backbone = load_backbone(base, device)
        folder = out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = diagnose(backbone, settings, folder, probes=chosen,
                          on_stage=lambda stage: console.print(f"diagnose: {stage}", highlight=False))
        markdown = diagnose_markdown(result, _invocation("diagnose"))
        plain = without_samples(result)
        if out is not None:
            atomic_write(out / "diagnose.md", markdown.encode())
            atomic_write(out / "diagnose.json", json.dumps(plain, indent=2, default=str).encode())
            grid = grid_rows(result)
            if grid is not None:
                write_grid_png(grid.reshape(-1, *grid.shape[2:]), out / "diagnose.png", columns=grid.shape[1])
        if docs is not None:
            replace_docs_section(docs, "diagnose", markdown)
    if as_json:
        print_json(plain)
    else:
        sys.stdout.write(markdown)


def _invocation(command: str) -> str:
    """The command line as typed (for the docs), starting at the sub-command."""
    args = sys.argv[sys.argv.index(command) + 1:] if command in sys.argv else []
    return f"motiondirector toyworld {command} {shlex.join(args)}".strip()


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="toyworld")
