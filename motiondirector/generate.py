"""Generation: compose LoRA packages on a base model, sample videos, write them with a replayable sidecar.

Each package becomes its own named adapter (`motion_0`, `motion_1`, ..., `appearance_0`, ...) at
`W0 + γ·ΔW` with its own γ, all routed on together. Motions are temporal packages, appearances
spatial ones; without `--appearance` only temporal LoRAs change the model (the paper's inference).
Mixing videos is the same thing with packages from two runs.

Every video gets its own seed (`seed + index`) and its initial noise from a CPU `torch.Generator`
seeded with it, so a sidecar (which records the resolved packages, their hashes and that seed)
replays to the same frames on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from motiondirector.backbones.base import BackboneSpec
from motiondirector.data.records import fingerprint
from motiondirector.errors import describe_validation_error
from motiondirector.lora import inject
from motiondirector.lora.inject import apply_package
from motiondirector.lora.interop import plain_linears
from motiondirector.lora.package import (
    ADAPTER_WEIGHTS,
    LoraKind,
    Manifest,
    PackageError,
)
from motiondirector.sample import SamplingSettings, ddim_invert, latent_shape, sample_videos
from motiondirector.storage import atomic_write, cache_root, local_path, sha256_file, staged_folder
from motiondirector.train.resolve import LoraCatalog, resolve_lora

SIDECAR_SCHEMA_VERSION = 1
NOISE_PRIOR_INVERSION_STEPS = 50
_ROLES: dict[str, LoraKind] = {"motion": "temporal", "appearance": "spatial"}


# --- parameters -------------------------------------------------------------------------------

class LoraChoice(BaseModel):
    """One package to apply, as the user named it, and its scale γ."""

    model_config = ConfigDict(extra="forbid")
    reference: str
    scale: float = 1.0


class GenerationParams(BaseModel):
    """Everything that determines the generated videos. A sidecar stores it for one video."""

    model_config = ConfigDict(extra="forbid")

    base: str
    prompts: list[str] = Field(min_length=1)
    negative_prompt: str = ""
    motions: list[LoraChoice] = Field(default_factory=list)
    appearances: list[LoraChoice] = Field(default_factory=list)
    steps: int = Field(30, ge=1)
    guidance: float = Field(12.0, ge=0)
    frames: int = Field(16, ge=1)
    height: int = Field(384, ge=8)
    width: int = Field(384, ge=8)
    fps: float = Field(8.0, gt=0)
    seed: int | None = Field(None, ge=0, description="Seed of the first video; video i uses seed + i. "
                                                    "None: drawn at random and recorded.")
    noise_prior: float = Field(0.0, ge=0.0, le=1.0)
    reference_video: str | None = None
    fuse: bool = Field(False, description="Fold the LoRAs into the weights before sampling (faster).")
    first_index: int = Field(0, ge=0, description="Index of the first video in output names.")

    @model_validator(mode="after")
    def _prior_needs_reference(self) -> GenerationParams:
        if self.noise_prior > 0 and not self.reference_video:
            raise ValueError("noise_prior > 0 needs a reference video (--reference VIDEO)")
        if self.reference_video and self.noise_prior == 0:
            raise ValueError("a reference video is only used by the noise prior: give --noise-prior P > 0")
        return self

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(steps=self.steps, guidance=self.guidance, frames=self.frames,
                                height=self.height, width=self.width)

    def choices(self) -> list[tuple[str, LoraChoice]]:
        """(role, choice) in adapter order: motions first, then appearances."""
        return [("motion", c) for c in self.motions] + [("appearance", c) for c in self.appearances]


@dataclass
class AppliedLora:
    """A package loaded as a named adapter."""

    name: str
    role: str
    reference: str
    folder: Path
    manifest: Manifest
    scale: float
    weights_sha256: str

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "reference": self.reference, "package": str(self.folder),
                "kind": self.manifest.kind, "scale": self.scale, "step": self.manifest.step,
                "rank": self.manifest.rank, "weights_sha256": self.weights_sha256}


@dataclass
class GeneratedVideo:
    index: int
    prompt: str
    seed: int
    frames: torch.Tensor  # (F, H, W, 3) float in [0, 1]
    files: dict[str, Path] = field(default_factory=dict)  # mp4, gif, png, json (the sidecar)


# --- composing packages -----------------------------------------------------------------------

@contextlib.contextmanager
def composed(backbone: BackboneSpec, choices: list[tuple[str, LoraChoice]], *, fuse: bool = False,
             catalog: LoraCatalog | None = None) -> Iterator[list[AppliedLora]]:
    """Apply (role, choice) packages as adapters `<role>_<i>`, all active; undone on exit.

    The backbone is left as it was found, so a long-lived process (Serve) can compose per request.
    """
    unet = backbone.unet
    applied: list[AppliedLora] = []
    counters = dict.fromkeys(_ROLES, 0)
    try:
        for role, choice in choices:
            kind = _ROLES[role]
            folder = resolve_lora(choice.reference, kind, catalog).resolve()
            name = f"{role}_{counters[role]}"
            counters[role] += 1
            manifest = apply_package(unet, backbone.architecture_fingerprint, folder, name, expected_kind=kind,
                                     scale=choice.scale)
            applied.append(AppliedLora(name, role, choice.reference, folder, manifest, choice.scale,
                                       sha256_file(folder / ADAPTER_WEIGHTS)))
        with inject.active(unet, [lora.name for lora in applied]):
            if not fuse:
                yield applied
                return
            inject.fuse(unet, [lora.name for lora in applied])
            try:
                with plain_linears(unet):  # fused: no LoRA dispatch left in the forward pass
                    yield applied
            finally:
                inject.unfuse(unet)
    finally:
        for lora in applied:
            inject.remove_adapter(unet, lora.name)


# --- noise prior ------------------------------------------------------------------------------

def reference_clip(video: str | Path, frames: int, size: tuple[int, int], fps: float) -> tuple[torch.Tensor, str]:
    """The first `frames` frames of `video` sampled at `fps` and fitted to `size`: (1, F, H, W, 3) uint8.

    Returns the frames and their fingerprint (content hash, frame indices, size, crop).
    """
    from motiondirector.data.clips import ClipPolicy, fit_frames, plan_clips
    from motiondirector.data.video import content_hash, probe_video, read_frames

    path = str(video)
    indices = plan_clips(probe_video(path), ClipPolicy(frames=frames, fps=fps))[0]
    pixels = fit_frames(read_frames(path, indices), size, crop="center")
    identity = fingerprint("reference-clip", content_hash(path), indices, list(size), "center")
    return torch.from_numpy(pixels).unsqueeze(0), identity


def noise_prior_latents(backbone: BackboneSpec, video: str | Path, params: GenerationParams, *,
                        cache_dir: str | Path | None = None,
                        on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """z_inv (1, C, F, h, w): 50-step DDIM inversion of the reference clip with an empty prompt.

    Inverted with the base model alone (no adapters), so the result only depends on the clip and
    the base and is cached under the cache root by their fingerprint.
    """
    clip, clip_id = reference_clip(video, params.frames, (params.height, params.width), params.fps)
    key = fingerprint("noise-prior", clip_id, backbone.model_id, backbone.architecture_fingerprint,
                      backbone.vae_id, NOISE_PRIOR_INVERSION_STEPS)
    cached = cache_root(cache_dir) / "noise_prior" / f"{key}.safetensors"
    if cached.is_file():
        return load_file(str(cached))["z_inv"]
    # The posterior mean, not a sample: the prior must not depend on a random draw.
    latents = backbone.encode_video(clip).mean * backbone.latent_scaling_factor
    with inject.active(backbone.unet, []):
        inverted = ddim_invert(backbone, latents, steps=NOISE_PRIOR_INVERSION_STEPS, on_step=on_step)
    inverted = inverted.float().cpu().contiguous()
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, safetensors_bytes({"z_inv": inverted}, metadata={"video": str(video)}))
    return inverted


def initial_noise(backbone: BackboneSpec, settings: SamplingSettings, seed: int,
                  prior: torch.Tensor | None = None, prior_strength: float = 0.0) -> torch.Tensor:
    """N(0, I) from a CPU generator seeded with `seed`, mixed with the prior: sqrt(p)·z_inv + sqrt(1−p)·ε."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latent_shape(backbone, settings, 1), generator=generator, dtype=torch.float32)
    if prior is None or prior_strength == 0:
        return noise
    if tuple(prior.shape) != tuple(noise.shape):
        raise ValueError(f"noise prior has shape {tuple(prior.shape)}, the videos need {tuple(noise.shape)}")
    return math.sqrt(prior_strength) * prior.float() + math.sqrt(1.0 - prior_strength) * noise


# --- generation -------------------------------------------------------------------------------

def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "video"


def _absolute_if_local(reference: str) -> str:
    """Local paths become absolute so a sidecar replays from any working folder."""
    path = local_path(reference)
    return str(path.resolve()) if path.exists() else reference


def generate(params: GenerationParams, out_dir: str | Path | None = None, *,
             backbone: BackboneSpec | None = None, device: str | torch.device | None = None,
             catalog: LoraCatalog | None = None, cache_dir: str | Path | None = None,
             progress: bool = True) -> list[GeneratedVideo]:
    """Generate one video per prompt; with `out_dir`, write mp4 + gif + png grid + JSON sidecar each.

    `backbone` reuses a loaded model (it is left unchanged); otherwise `params.base` is loaded on `device`.
    """
    if backbone is None:
        from motiondirector.backbones import load_backbone

        backbone = load_backbone(params.base, device)
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    settings = params.sampling
    latent_shape(backbone, settings, 1)  # refuse a bad --size before any work
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        prior = None
        if params.noise_prior > 0:
            task = bar.add_task("noise prior (DDIM inversion)", total=NOISE_PRIOR_INVERSION_STEPS)
            prior = noise_prior_latents(backbone, params.reference_video, params, cache_dir=cache_dir,
                                        on_step=lambda done, _: bar.update(task, completed=done))
        videos = []
        with composed(backbone, params.choices(), fuse=params.fuse, catalog=catalog) as applied:
            for offset, prompt in enumerate(params.prompts):
                index, video_seed = params.first_index + offset, seed + offset
                task = bar.add_task(f"video {offset + 1}/{len(params.prompts)}", total=settings.steps)
                started = time.perf_counter()
                frames = sample_videos(backbone, [prompt], settings,
                                       initial_noise=initial_noise(backbone, settings, video_seed, prior,
                                                                   params.noise_prior),
                                       negative_prompt=params.negative_prompt,
                                       on_step=lambda done, _, task=task: bar.update(task, completed=done))[0].cpu()
                video = GeneratedVideo(index, prompt, video_seed, frames)
                if out_dir is not None:
                    video.files = _write_outputs(video, params, applied, backbone, Path(out_dir),
                                                 seconds=time.perf_counter() - started)
                videos.append(video)
    return videos


def _write_outputs(video: GeneratedVideo, params: GenerationParams, applied: list[AppliedLora],
                   backbone: BackboneSpec, out_dir: Path, seconds: float) -> dict[str, Path]:
    from motiondirector.video_io import write_gif, write_grid_png, write_video

    stem = f"{video.index}-{slugify(video.prompt)}-{video.seed}"
    files = {"mp4": write_video(video.frames, out_dir / f"{stem}.mp4", params.fps),
             "gif": write_gif(video.frames, out_dir / f"{stem}.gif", params.fps),
             "png": write_grid_png(video.frames, out_dir / f"{stem}.png")}
    by_role = {role: [LoraChoice(reference=str(lora.folder), scale=lora.scale)
                      for lora in applied if lora.role == role] for role in _ROLES}
    replay = params.model_copy(update={
        "base": _absolute_if_local(params.base), "prompts": [video.prompt], "seed": video.seed,
        "first_index": video.index, "motions": by_role["motion"], "appearances": by_role["appearance"],
        "reference_video": params.reference_video and _absolute_if_local(params.reference_video)})
    sidecar = {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "index": video.index,
        "prompt": video.prompt,
        "seed": video.seed,
        "params": replay.model_dump(mode="json"),
        "loras": [lora.record() for lora in applied],
        "base": {"model_id": backbone.model_id, "architecture": backbone.architecture_fingerprint},
        "files": {kind: path.name for kind, path in files.items()},
        "environment": {"device": str(backbone.device), "dtype": str(backbone.unet.dtype),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": round(seconds, 3),
        "created_at": datetime.now(UTC).isoformat(),
    }
    files["json"] = out_dir / f"{stem}.json"
    # Written last: a sidecar marks its video complete.
    atomic_write(files["json"], json.dumps(sidecar, indent=2).encode())
    return files


def validated_params(data: dict[str, Any], source: str) -> GenerationParams:
    """GenerationParams from a dict, with one-line errors naming `source` and the fields."""
    try:
        return GenerationParams.model_validate(data)
    except ValidationError as error:
        problems = describe_validation_error(error, GenerationParams, limit=5)
        raise ValueError(f"{source}: invalid generation parameters ({problems})") from None


def read_sidecar(path: str | Path) -> tuple[GenerationParams, dict[str, Any]]:
    """The replayable parameters of a sidecar and the whole document."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        data = document["params"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such sidecar file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a generation sidecar ({type(error).__name__}: {error})") from None
    return validated_params(data, f"{path} params"), document


def replay(sidecar: str | Path, out_dir: str | Path | None = None, **kwargs: Any) -> list[GeneratedVideo]:
    """Generate again from a sidecar; refuses when a package's weights changed since (output would differ)."""
    params, document = read_sidecar(sidecar)
    for lora in document.get("loras", []):
        weights = Path(lora["package"]) / ADAPTER_WEIGHTS
        if weights.is_file() and sha256_file(weights) != lora["weights_sha256"]:
            raise PackageError(f"{weights}: changed since {sidecar} was written (sha256 differs); "
                               "the replay would not reproduce the video")
    return generate(params, out_dir, **kwargs)


def package_base(params: GenerationParams, catalog: LoraCatalog | None = None) -> str:
    """The base model the first motion/appearance package was trained on (for an omitted --base)."""
    from motiondirector.lora.package import read_manifest

    choices = params.choices()
    if not choices:
        raise ValueError("--base is needed when no --motion or --appearance names the model")
    role, choice = choices[0]
    return read_manifest(resolve_lora(choice.reference, _ROLES[role], catalog)).base.model_id


# --- image animation ------------------------------------------------------------------------------

# The reference's single-image recipe (method.md): spatial LoRA only, one LoRA for all images.
# Single-frame steps need little activation memory, so no gradient checkpointing (its recompute
# would also run outside the spatial path's temporal bypass).
IMAGE_TRAINING = {"mode": "spatial_only", "spatial_lora": "shared", "optimizer": {"weight_decay": 1e-4},
                  "checkpoint_every": 0, "validation": {"every": 0}, "gradient_checkpointing": False}
IMAGE_HFLIP = 0.5
ANIMATE_FOLDER = "animate"


def image_appearance(images: list[str | Path], caption: str, backbone: BackboneSpec, *, steps: int = 300,
                     size: tuple[int, int] = (384, 384), seed: int = 0, rank: int = 32,
                     cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """A spatial LoRA trained on `images` (each repeated as a clip), cached under the cache root by the
    images' content hashes and every training setting; returns its package folder."""
    from motiondirector.config import validate_config
    from motiondirector.data.video import content_hash
    from motiondirector.train.layout import RunLayout
    from motiondirector.train.loop import train

    if not images:
        raise ValueError("animate needs at least one image")
    sources = [str(Path(image).expanduser().resolve()) for image in images]
    config = validate_config({
        **IMAGE_TRAINING, "base": backbone.model_id, "device": str(backbone.device), "seed": seed, "steps": steps,
        "lora": {"rank": rank}, "cache_dir": str(cache_dir) if cache_dir else None,
        # One frame per clip: the spatial path trains on single frames, and images do not move.
        "data": {"name": "animate", "sources": sources, "kind": "image", "caption": caption,
                 "caption_source": "fixed", "frames": 1, "size": list(size), "hflip": IMAGE_HFLIP},
    }, "animate settings")
    recipe = config.model_dump(mode="json")
    for machine_specific in ("device", "cache_dir"):
        recipe.pop(machine_specific)
    recipe["data"].pop("sources")  # the images enter the key by content, not by path
    key = fingerprint("animate", sorted(content_hash(s) for s in sources), backbone.architecture_fingerprint,
                      recipe)
    root = cache_root(cache_dir) / ANIMATE_FOLDER
    run = RunLayout(root / key)
    if not (run.summary.is_file() and (run.spatial(0) / "manifest.json").is_file()):
        with staged_folder(run.root) as staging:  # another process finishing it first wins
            train(config, staging, backbone=backbone, progress=progress)
    return run.spatial(0)


def animate(images: list[str | Path], params: GenerationParams, out_dir: str | Path | None = None, *,
            caption: str | None = None, steps_train: int = 300, appearance_scale: float = 1.0,
            backbone: BackboneSpec | None = None, device: str | torch.device | None = None,
            catalog: LoraCatalog | None = None, cache_dir: str | Path | None = None,
            progress: bool = True) -> list[GeneratedVideo]:
    """Animate images: their appearance (a cached spatial LoRA) with `params.motions`, then `generate`."""
    if not params.motions:
        raise ValueError("animate needs a motion: --motion LORA")
    if backbone is None:
        from motiondirector.backbones import load_backbone

        backbone = load_backbone(params.base, device)
    package = image_appearance(images, caption or params.prompts[0], backbone,
                               steps=steps_train, size=(params.height, params.width), cache_dir=cache_dir,
                               progress=progress)
    appearance = LoraChoice(reference=str(package), scale=appearance_scale)
    params = params.model_copy(update={"appearances": [*params.appearances, appearance]})
    return generate(params, out_dir, backbone=backbone, catalog=catalog, cache_dir=cache_dir, progress=progress)
