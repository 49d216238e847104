"""`motiondirector generate`: videos from a base model plus motion/appearance LoRAs, or a replay of a sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from motiondirector.commands.common import JsonOption, console, fail, print_json, reported_errors

LoraList = Annotated[list[str] | None, typer.Option(
    "--motion", help="Motion (temporal) LoRA: a package, a run folder, or RUN@step-<n>. Repeat to merge motions.")]
AppearanceList = Annotated[list[str] | None, typer.Option(
    "--appearance", help="Appearance (spatial) LoRA: a package, RUN/spatial/<k>, or a run with one spatial LoRA.")]


def parse_size(text: str) -> tuple[int, int]:
    """'384x384' (HEIGHTxWIDTH) or '384' -> (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 384x384") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 384x384")
    return values[0], values[1]


def pair_scales(option: str, references: list[str], scales: list[float]) -> list[dict]:
    """The i-th scale goes with the i-th LoRA; LoRAs without one get 1.0."""
    if len(scales) > len(references):
        raise ValueError(f"{len(scales)} {option}-scale values for {len(references)} {option} LoRAs")
    padded = list(scales) + [1.0] * (len(references) - len(scales))
    return [{"reference": ref, "scale": scale} for ref, scale in zip(references, padded, strict=True)]


def generate(
    out: Annotated[Path, typer.Option("--out", help="Folder for the videos and their sidecars.")],
    base: Annotated[str | None, typer.Option("--base", help="Base model: 'toy', a diffusers folder or a hub id.")]
    = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="One video per prompt.")] = None,
    motion: LoraList = None,
    motion_scale: Annotated[list[float] | None, typer.Option("--motion-scale", help="γ of the i-th --motion.")]
    = None,
    appearance: AppearanceList = None,
    appearance_scale: Annotated[list[float] | None, typer.Option(
        "--appearance-scale", help="γ of the i-th --appearance.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    steps: Annotated[int, typer.Option("--steps", min=1, help="DDIM steps.")] = 30,
    guidance: Annotated[float, typer.Option("--guidance", min=0, help="Classifier-free guidance scale.")] = 12.0,
    frames: Annotated[int, typer.Option("--frames", min=1)] = 16,
    size: Annotated[str, typer.Option("--size", help="HEIGHTxWIDTH")] = "384x384",
    fps: Annotated[float, typer.Option("--fps", min=0.1)] = 8.0,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Seed of the first video (video i: seed+i); "
                                             "default: random, recorded in the sidecar.")] = None,
    noise_prior: Annotated[float, typer.Option("--noise-prior", min=0.0, max=1.0,
                                               help="Strength p of the reference clip's inverted noise.")] = 0.0,
    reference: Annotated[Path | None, typer.Option("--reference", help="Video for --noise-prior.")] = None,
    fuse: Annotated[bool, typer.Option("--fuse", help="Fold LoRAs into the weights (faster sampling).")] = False,
    replay_from: Annotated[Path | None, typer.Option(
        "--from", help="Replay a sidecar JSON: same parameters, seed and packages (other options are ignored).")]
    = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Cache root for noise priors.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Generate videos with learned motions (and appearances); write mp4, gif, png grid and a JSON sidecar."""
    from motiondirector import generate as generation

    with reported_errors():
        if replay_from is not None:
            videos = generation.replay(replay_from, out, device=device, cache_dir=cache_dir)
        else:
            if base is None or not prompt:
                raise fail("--base and at least one --prompt are needed (or --from SIDECAR.json)")
            height, width = parse_size(size)
            params = generation.validated_params(dict(
                base=base, prompts=prompt, negative_prompt=negative_prompt,
                motions=pair_scales("--motion", motion or [], motion_scale or []),
                appearances=pair_scales("--appearance", appearance or [], appearance_scale or []),
                steps=steps, guidance=guidance, frames=frames, height=height, width=width, fps=fps, seed=seed,
                noise_prior=noise_prior, reference_video=str(reference) if reference else None, fuse=fuse),
                "generate options")
            videos = generation.generate(params, out, device=device, cache_dir=cache_dir)
    if as_json:
        print_json([{"index": v.index, "prompt": v.prompt, "seed": v.seed,
                     "files": {kind: str(path) for kind, path in v.files.items()}} for v in videos])
        return
    for video in videos:
        console.print(f"{video.files['mp4']}  (seed {video.seed})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
