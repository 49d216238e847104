"""`motiondirector demo --out DIR` (what `make demo` runs): the whole method on the embedded toy model.

Renders clips of the held-out motion (the reference and, by default, five other looks: the paper's
multi-video setting, which the toy benchmark found transfer needs), trains a dual-path LoRA on them,
generates that motion with an appearance none of them has and on the reference prompt itself (each
also from the base model with the same noise, for comparison) and prints the output paths with the
probes' scores: the reference prompt shows whether the motion was learnt, the new appearance whether
it transfers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motiondirector.commands.common import DeviceOption, JsonOption, console, print_json, reported_errors
from motiondirector.commands.observers import RichProgress

REFERENCE_PROMPT = "a red circle moving in a zigzag on a grey background"
TARGET_PROMPT = "a blue square moving in a zigzag on a black background"


def _backbone(base: str, out: Path, device: str):
    """The named model, or (only for the embedded toy model, when its weights are missing) a random one."""
    from motiondirector.api import ModelNotAvailableError, load_backbone

    try:
        return load_backbone(base, device)
    except ModelNotAvailableError:
        if base != "toy":
            raise
        from motiondirector.api import write_tiny_model
        from motiondirector.toyworld.pretrain import toy_model_config

        console.print("[bold yellow]notice:[/] the embedded toy model is missing its weights; running the demo on a "
                      "freshly built RANDOM model of the same architecture (outputs will be noise). Rebuild it with "
                      "`motiondirector toyworld pretrain`.", highlight=False)
        return load_backbone(str(write_tiny_model(out / "random-toy-model", toy_model_config())), device)


def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("demo-out"),
    base: Annotated[str, typer.Option("--base", help="Base model (default: the embedded toy model).")] = "toy",
    steps: Annotated[int, typer.Option("--steps", min=1, help="LoRA training steps.")] = 600,
    videos: Annotated[int, typer.Option("--videos", min=1, help="Videos to generate per model.")] = 4,
    looks: Annotated[int, typer.Option(
        "--looks", min=1, help="Training clips: the reference and looks-1 other appearances of its motion "
                               "(1: the reference clip alone).")] = 6,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Render reference clips, train a dual-path motion LoRA on them, generate the motion with a new look."""
    from motiondirector.api import (
        GenerationParams,
        LoraChoice,
        generate,
        save_videos,
        train,
        write_gif,
        write_video,
    )
    from motiondirector.toyworld.benchmark import (
        BenchmarkSettings,
        clip_records,
        reference_scenes,
        train_config,
    )
    from motiondirector.toyworld.evaluate import score_sample
    from motiondirector.toyworld.render import parse_caption, render

    with reported_errors():
        backbone = _backbone(base, out, device)
        native = backbone.defaults  # the clip and the videos at the model's own frames, size and sampling
        reference_scene, target = parse_caption(REFERENCE_PROMPT), parse_caption(TARGET_PROMPT)
        # The other looks differ from the reference in colour, shape and background and are not the target.
        try:
            scenes = reference_scenes(reference_scene, [target], looks, "varied")
        except ValueError as error:
            raise ValueError(f"--looks {looks}: {error}") from None
        clips = [render(scene, frames=native.frames, size=(native.height, native.width), seed=seed + index)
                 for index, scene in enumerate(scenes)]
        clip = clips[0]
        reference_files = [write_video(clip.frames, out / "reference.mp4"), write_gif(clip.frames, out / "reference.gif")]
        console.print(f"1/3 reference clip: {REFERENCE_PROMPT!r} -> {reference_files[0]}"
                      + "".join(f"\n    and {other.caption!r}" for other in clips[1:]), highlight=False)

        console.print(f"2/3 training a dual-path LoRA on {looks} clip{'s' if looks > 1 else ''} ({steps} steps)",
                      highlight=False)
        config = train_config(BenchmarkSettings(steps=steps), backbone, "dual_path", looks, clip.caption)
        with RichProgress(console) as bars:
            summary = train(config, out / "run", overwrite=True, backbone=backbone,
                            records=clip_records(backbone, clips), observers=[bars])

        console.print(f"3/3 generating {TARGET_PROMPT!r} (new appearance) and {REFERENCE_PROMPT!r} (the reference "
                      "prompt) with the motion LoRA and with the base model", highlight=False)
        results = {}
        lora = [LoraChoice(reference=summary.packages["temporal"])]
        for label, prompt, asked, motions in (("with-lora", TARGET_PROMPT, target, lora),
                                              ("base", TARGET_PROMPT, target, []),
                                              ("with-lora-reference-prompt", REFERENCE_PROMPT, reference_scene, lora),
                                              ("base-reference-prompt", REFERENCE_PROMPT, reference_scene, [])):
            params = GenerationParams(base=base, prompts=[prompt] * videos, motions=motions, seed=seed)
            generated = save_videos(generate(params, backbone=backbone), out / label)
            leak_reference = reference_scene if asked is target else None  # no leakage on the reference's own look
            results[label] = [{"files": {k: str(v) for k, v in video.files.items()}, "seed": video.seed,
                               "prompt": prompt,
                               "scores": score_sample(video.frames, asked, video.seed, leak_reference,
                                                      clip.trajectory)} for video in generated]
    payload = {"reference": {"prompt": REFERENCE_PROMPT, "files": [str(p) for p in reference_files]},
               "training_clips": [c.caption for c in clips],
               "lora": summary.packages["temporal"], "prompt": TARGET_PROMPT, "videos": results}
    if as_json:
        print_json(payload)
        return
    for label, rows in results.items():
        typer.echo(f"{label} ({rows[0]['prompt']!r}):")
        for row in rows:
            s = row["scores"]
            leaked = "" if "leak_any" not in s else f", reference appearance leaked: {'yes' if s['leak_any'] else 'no'}"
            typer.echo(f"  {row['files']['mp4']}: motion fidelity {s['fidelity']:+.2f} (vertical swing "
                       f"{_signed(s['y_corr'])}), colour {'ok' if s['colour'] else 'wrong'}, shape "
                       f"{'ok' if s['shape'] else 'wrong'}, background {'ok' if s['background'] else 'wrong'}, "
                       f"one object in {s['one_object']:.0%} of frames{leaked}")
    typer.echo(f"reference clip: {reference_files[0]}\nmotion LoRA: {summary.packages['temporal']}")


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
