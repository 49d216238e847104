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
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from motiondirector.backbones.base import BackboneSpec
from motiondirector.backbones.defaults import ModelDefaults
from motiondirector.errors import describe_validation_error
from motiondirector.events import Observer, progress_callback
from motiondirector.lora import inject
from motiondirector.lora.inject import apply_package
from motiondirector.lora.interop import plain_linears
from motiondirector.lora.package import (
    ADAPTER_WEIGHTS,
    LoraKind,
    Manifest,
    PackageError,
)
from motiondirector.noise_prior import initial_noise, noise_prior_latents
from motiondirector.sample import SamplingSettings, latent_shape, sample_videos
from motiondirector.storage import atomic_write, local_path, sha256_file
from motiondirector.train.resolve import LoraCatalog, resolve_lora

SIDECAR_SCHEMA_VERSION = 1
_ROLES: dict[str, LoraKind] = {"motion": "temporal", "appearance": "spatial"}
_DEFAULTED = ("steps", "guidance", "frames", "height", "width", "fps")


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
    # None: the base model's own value (backbones/defaults.py); the sidecar records the value used.
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    frames: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    fps: float | None = Field(None, gt=0)
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0, description="Guidance rescale φ (Lin et al. 2024); "
                                                                    "0 = plain classifier-free guidance.")
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

    def with_defaults(self, defaults: ModelDefaults) -> GenerationParams:
        """Every unset sampling value taken from the base model's defaults."""
        return self.model_copy(update={k: v for k, v in defaults.values().items() if getattr(self, k) is None})

    @property
    def sampling(self) -> SamplingSettings:
        unset = [name for name in _DEFAULTED if getattr(self, name) is None]
        if unset:
            raise ValueError(f"generation parameters {', '.join(unset)} are unset: apply the model's defaults first "
                             "(GenerationParams.with_defaults)")
        return SamplingSettings(steps=self.steps, guidance=self.guidance, frames=self.frames,
                                height=self.height, width=self.width, guidance_rescale=self.guidance_rescale)

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
    sidecar: dict[str, Any]  # the replayable record of this video (parameters used, packages, seed)
    files: dict[str, Path] = field(default_factory=dict)  # after save_video: mp4, gif, png, json (the sidecar)

    @property
    def fps(self) -> float:
        return float(self.sidecar["params"]["fps"])


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


# --- generation -------------------------------------------------------------------------------

def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "video"


def _absolute_if_local(reference: str) -> str:
    """Local paths become absolute so a sidecar replays from any working folder."""
    path = local_path(reference)
    return str(path.resolve()) if path.exists() else reference


def generate(params: GenerationParams, *, backbone: BackboneSpec | None = None,
             device: str | torch.device | None = None, catalog: LoraCatalog | None = None,
             cache_dir: str | Path | None = None, observers: Sequence[Observer] = ()) -> list[GeneratedVideo]:
    """Generate one video per prompt, in memory: frames + the sidecar document (`save_video` writes files).

    Sampling values left unset take the base model's defaults. `backbone` reuses a loaded model (it is
    left unchanged); otherwise `params.base` is loaded on `device`. Progress goes to `observers`
    (phases "noise_prior" and "sample").
    """
    if backbone is None:
        from motiondirector.backbones import load_backbone

        backbone = load_backbone(params.base, device)
    params = params.with_defaults(backbone.defaults)
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    settings = params.sampling
    latent_shape(backbone, settings, 1)  # refuse a bad size before any work
    prior = None
    if params.noise_prior > 0:
        prior = noise_prior_latents(backbone, params.reference_video, frames=params.frames,
                                    size=(params.height, params.width), fps=params.fps, cache_dir=cache_dir,
                                    on_step=progress_callback(observers, "noise_prior"))
    videos = []
    with composed(backbone, params.choices(), fuse=params.fuse, catalog=catalog) as applied:
        for offset, prompt in enumerate(params.prompts):
            index, video_seed = params.first_index + offset, seed + offset
            started = time.perf_counter()
            on_step = progress_callback(observers, "sample", f"video {offset + 1}/{len(params.prompts)}")
            frames = sample_videos(backbone, [prompt], settings,
                                   initial_noise=initial_noise(backbone, settings, video_seed, prior,
                                                               params.noise_prior),
                                   negative_prompt=params.negative_prompt, on_step=on_step)[0].cpu()
            sidecar = _sidecar(index, prompt, video_seed, params, applied, backbone,
                               seconds=time.perf_counter() - started)
            videos.append(GeneratedVideo(index, prompt, video_seed, frames, sidecar))
    return videos


# Fields a batch's items must share (everything but the prompt, the seed and the output index).
_PER_VIDEO = {"prompts", "seed", "first_index"}


class HeldComposition:
    """A LoRA set applied to a backbone and kept applied until `close()` (a server keeps one between batches).

    The same packages at the same scales as `composed(backbone, choices)`, entered once: requests for
    this set then skip adapter injection (`generate_batch(..., composition=held)`). Closing hands the
    backbone back as it was. One at a time per backbone: the model is modified in place.
    """

    def __init__(self, backbone: BackboneSpec, choices: list[tuple[str, LoraChoice]], *,
                 catalog: LoraCatalog | None = None) -> None:
        self.backbone = backbone
        self.choices = [(role, choice.model_copy()) for role, choice in choices]
        self._stack = contextlib.ExitStack()
        self.applied: list[AppliedLora] = self._stack.enter_context(composed(backbone, self.choices, catalog=catalog))

    def matches(self, choices: list[tuple[str, LoraChoice]]) -> bool:
        return [(role, c.model_dump()) for role, c in choices] == [(role, c.model_dump()) for role, c in self.choices]

    def close(self) -> None:
        self._stack.close()


def generate_batch(items: Sequence[GenerationParams], *, backbone: BackboneSpec,
                   catalog: LoraCatalog | None = None, observers: Sequence[Observer] = (),
                   composition: HeldComposition | None = None) -> list[GeneratedVideo]:
    """One video per item, sampled together in one sampler call (what a server batches).

    Items have one prompt each and must share everything else but the seed (LoRAs and scales,
    sampling settings, negative prompt; no noise prior). Each video's initial noise comes from its
    own seed exactly as in `generate`, so a batch of one is `generate` bit for bit; larger batches
    match it up to float rounding of the batched kernels. Progress: phase "sample", label "N videos".
    `composition`: the items' LoRA set, already applied and held (it must match them; no fuse).
    """
    if not items:
        return []
    items = [item.with_defaults(backbone.defaults) for item in items]
    first = items[0]
    shared = first.model_dump(exclude=_PER_VIDEO)
    for position, item in enumerate(items):
        if len(item.prompts) != 1:
            raise ValueError(f"batch item {position}: one prompt per item, got {len(item.prompts)}")
        if item.noise_prior > 0:
            raise ValueError(f"batch item {position}: the noise prior is not batched; use generate()")
        if item.model_dump(exclude=_PER_VIDEO) != shared:
            raise ValueError(f"batch item {position}: differs from item 0 in LoRAs or sampling settings")
    seeds = [item.seed if item.seed is not None else secrets.randbelow(2**31) for item in items]
    settings = first.sampling
    latent_shape(backbone, settings, 1)  # refuse a bad size before any work
    if composition is not None:
        if composition.backbone is not backbone or first.fuse or not composition.matches(first.choices()):
            raise ValueError("the held composition is not the items' LoRA set on this backbone (or fuse is asked)")
        context: contextlib.AbstractContextManager[list[AppliedLora]] = contextlib.nullcontext(composition.applied)
    else:
        context = composed(backbone, first.choices(), fuse=first.fuse, catalog=catalog)
    with context as applied:
        started = time.perf_counter()
        noise = torch.cat([initial_noise(backbone, settings, seed) for seed in seeds])
        frames = sample_videos(backbone, [item.prompts[0] for item in items], settings, initial_noise=noise,
                               negative_prompt=first.negative_prompt,
                               on_step=progress_callback(observers, "sample", f"{len(items)} videos")).cpu()
        seconds = time.perf_counter() - started
        return [GeneratedVideo(item.first_index, item.prompts[0], seed, frames[position],
                               _sidecar(item.first_index, item.prompts[0], seed, item, applied, backbone, seconds))
                for position, (item, seed) in enumerate(zip(items, seeds, strict=True))]


def _sidecar(index: int, prompt: str, seed: int, params: GenerationParams, applied: list[AppliedLora],
             backbone: BackboneSpec, seconds: float) -> dict[str, Any]:
    """Everything needed to replay one video: the resolved parameters, packages with hashes, seed."""
    by_role = {role: [LoraChoice(reference=str(lora.folder), scale=lora.scale)
                      for lora in applied if lora.role == role] for role in _ROLES}
    replay = params.model_copy(update={
        "base": _absolute_if_local(params.base), "prompts": [prompt], "seed": seed,
        "first_index": index, "motions": by_role["motion"], "appearances": by_role["appearance"],
        "reference_video": params.reference_video and _absolute_if_local(params.reference_video)})
    return {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "params": replay.model_dump(mode="json"),
        "defaults_source": backbone.defaults.source,
        "loras": [lora.record() for lora in applied],
        "base": {"model_id": backbone.model_id, "architecture": backbone.architecture_fingerprint},
        "environment": {"device": str(backbone.device), "dtype": str(backbone.unet.dtype),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": round(seconds, 3),
        "created_at": datetime.now(UTC).isoformat(),
    }


def video_stem(video: GeneratedVideo) -> str:
    return f"{video.index}-{slugify(video.prompt)}-{video.seed}"


def save_video(video: GeneratedVideo, out_dir: str | Path) -> dict[str, Path]:
    """Write mp4 + gif + png grid, then the JSON sidecar last (a sidecar marks its video complete)."""
    from motiondirector.video_io import write_gif, write_grid_png, write_video

    out_dir, stem = Path(out_dir), video_stem(video)
    files = {"mp4": write_video(video.frames, out_dir / f"{stem}.mp4", video.fps),
             "gif": write_gif(video.frames, out_dir / f"{stem}.gif", video.fps),
             "png": write_grid_png(video.frames, out_dir / f"{stem}.png")}
    files["json"] = out_dir / f"{stem}.json"
    document = {**video.sidecar, "files": {kind: path.name for kind, path in files.items()}}
    atomic_write(files["json"], json.dumps(document, indent=2).encode())
    video.files = files
    return files


def save_videos(videos: list[GeneratedVideo], out_dir: str | Path) -> list[GeneratedVideo]:
    for video in videos:
        save_video(video, out_dir)
    return videos


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


def replay(sidecar: str | Path, **kwargs: Any) -> list[GeneratedVideo]:
    """Generate again from a sidecar; refuses when a package's weights changed since (output would differ)."""
    params, document = read_sidecar(sidecar)
    for lora in document.get("loras", []):
        weights = Path(lora["package"]) / ADAPTER_WEIGHTS
        if weights.is_file() and sha256_file(weights) != lora["weights_sha256"]:
            raise PackageError(f"{weights}: changed since {sidecar} was written (sha256 differs); "
                               "the replay would not reproduce the video")
    return generate(params, **kwargs)


def package_base(params: GenerationParams, catalog: LoraCatalog | None = None) -> str:
    """The base model the first motion/appearance package was trained on (for an omitted --base)."""
    from motiondirector.lora.package import read_manifest

    choices = params.choices()
    if not choices:
        raise ValueError("--base is needed when no --motion or --appearance names the model")
    role, choice = choices[0]
    return read_manifest(resolve_lora(choice.reference, _ROLES[role], catalog)).base.model_id
