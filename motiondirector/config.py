"""The training configuration: one YAML file validated by pydantic (reference in docs/training.md).

Every section forbids unknown keys, so a mistyped key is an error that names it instead of a
silently ignored setting. Defaults follow the reference configs in method.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from motiondirector.backbones.defaults import ModelDefaults
from motiondirector.data.reference import DatasetReference
from motiondirector.data.sources import DatasetSpec
from motiondirector.errors import describe_validation_error
from motiondirector.lora.settings import LoraSettings
from motiondirector.sample import SamplingSettings
from motiondirector.storage import normalize

Mode = Literal["dual_path", "dual_path_no_ad", "coupled", "spatial_only"]
Routing = Literal["auto", "per_video", "shared", "per_clip"]
Precision = Literal["auto", "no", "fp16", "bf16"]

# The data section: a DatasetSpec, or a DatasetReference (`dataset: "<ingest URI>#<name>"`, chosen by
# TrainConfig._dataset_reference so errors keep their `data.<key>` names and hints); the loop only
# ever sees the list of CacheRecords it resolves to.
DataSection = SerializeAsAny[DatasetSpec]


class ConfigError(ValueError):
    """A config file (or a --set override) is invalid; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSection(_Section):
    rank: int = Field(32, ge=1)
    alpha: float | None = Field(None, gt=0, description="None: alpha = rank (the reference's scale 1).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @property
    def settings(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout)


class OptimizerSection(_Section):
    """AdamW, one per path, constant learning rate (method.md)."""

    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-2, ge=0, description="Reference: 1e-2 single video, 1e-4 otherwise.")


class ValidationSection(_Section):
    """Validation samples through the DDIM sampler, temporal LoRA only (spatial_only: the spatial LoRA)."""

    every: int = Field(0, ge=0, description="Sample every N steps and at the end; 0 = never.")
    prompts: list[str] = Field(default_factory=list, description="Empty: the training captions.")
    # Unset: the base model's own sampling settings, frames, size and fps (backbones/defaults.py).
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    frames: int | None = Field(None, ge=1)
    size: tuple[int, int] | None = None
    fps: float | None = Field(None, gt=0)
    seed: int = 0
    noise_prior: float = Field(0.0, ge=0.0, le=1.0, description="Strength p of the reference clip's inverted noise "
                               "in the initial noise (the reference validates single videos at 0.5); 0: plain noise.")
    reference: str | None = Field(None, description="Video whose inverted noise the prior uses; unset: the first "
                                  "training video.")

    @model_validator(mode="after")
    def _reference_needs_prior(self) -> ValidationSection:
        if self.reference and self.noise_prior == 0:
            raise ValueError("validation.reference is only used by the noise prior: set validation.noise_prior > 0")
        return self

    def with_model_defaults(self, defaults: ModelDefaults) -> ValidationSection:
        native = {"steps": defaults.steps, "guidance": defaults.guidance, "frames": defaults.frames,
                  "size": (defaults.height, defaults.width), "fps": defaults.fps}
        return self.model_copy(update={k: v for k, v in native.items() if getattr(self, k) is None})

    @property
    def sampling(self) -> SamplingSettings:
        if None in (self.steps, self.guidance, self.frames, self.size):
            raise ValueError("validation sampling settings are unset: apply the base model's defaults first "
                             "(TrainConfig.with_model_defaults)")
        return SamplingSettings(steps=self.steps, guidance=self.guidance, frames=self.frames,
                                height=self.size[0], width=self.size[1])


class EngineSection(_Section):
    """How gradients become updates: plain torch, or DeepSpeed ZeRO (one DeepSpeed engine per LoRA)."""

    kind: Literal["torch", "deepspeed"] = "torch"
    # ZeRO-3 would partition the LoRA weights away from the UNet that runs the forward outside
    # DeepSpeed; stage 0 is what the torch engine already does.
    zero_stage: Literal[1, 2] = 2


class TimestepSection(_Section):
    """Timestep emphasis: a share of steps draws t from [high_from, T) instead of [0, T).

    On a zero-terminal-SNR base the motion is decided at high timesteps, where uniform draws spend
    few steps (docs/toyworld.md); 0 keeps the uniform draw of the reference code.
    """

    high_share: float | None = Field(None, ge=0.0, le=1.0, description="Share of steps drawing t from "
                                     "[high_from, T); unset: the base model's (0.5 at zero terminal SNR, else 0).")
    high_from: int = Field(800, ge=0, description="First timestep of the high range (must be < T).")


class DivergenceSection(_Section):
    """Stop a run whose loss explodes (e.g. a too-high lr or rank) instead of training garbage."""

    enabled: bool = True
    factor: float = Field(5.0, gt=1.0, description="Stop when a loss's recent mean exceeds factor × its early mean.")
    window: int = Field(20, ge=1, description="Steps in the early and the recent mean (each loss separately).")


class TrainConfig(_Section):
    base: str = Field(description="Base model: 'toy', a diffusers folder or a hub id.")
    device: str = "auto"
    seed: int = 0
    steps: int = Field(150, ge=1)
    mode: Mode | None = Field(None, description="Unset: dual_path for videos, spatial_only for images "
                                                "(temporal training is off for images, method.md).")
    lora: LoraSection = Field(default_factory=LoraSection)
    spatial_lora: Routing = Field("auto", description="auto: per_video for videos, shared for images.")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    spatial_skip_probability: float = Field(0.2, ge=0.0, le=1.0)
    ad_beta: float = Field(1.0, ge=0.0)
    mixed_precision: Precision = Field("auto", description="auto: bf16 (fp16 without bf16) on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = True
    gradient_accumulation: int = Field(1, ge=1, description="Draws per rank averaged into each optimizer step.")
    checkpoint_every: int = Field(50, ge=0, description="0: checkpoints only when interrupted.")
    validation: ValidationSection = Field(default_factory=ValidationSection)
    log_every: int = Field(1, ge=1)
    data: DataSection
    cache_dir: str | None = None
    engine: EngineSection = Field(default_factory=EngineSection)
    timesteps: TimestepSection = Field(default_factory=TimestepSection)
    divergence: DivergenceSection = Field(default_factory=DivergenceSection)

    @field_validator("data", mode="wrap")
    @classmethod
    def _dataset_reference(cls, value: Any, handler: Any) -> DatasetSpec | DatasetReference:
        if isinstance(value, DatasetReference) or (isinstance(value, dict) and "dataset" in value):
            return DatasetReference.model_validate(value)
        return handler(value)

    @model_validator(mode="after")
    def _coupled_is_one_lora_set(self) -> TrainConfig:
        if self.mode == "coupled" and self.spatial_lora in ("per_video", "per_clip"):
            raise ValueError(f"mode coupled trains one LoRA set on all data; spatial_lora must be 'shared' or "
                             f"'auto', not {self.spatial_lora!r}")
        return self

    def mode_for(self, images: bool) -> Mode:
        """The mode actually used, given whether the data are images: the user's, else the data's default."""
        if self.mode is not None:
            return self.mode
        return "spatial_only" if images else "dual_path"

    def with_data_kind(self, images: bool) -> TrainConfig:
        """This config with an unset mode set from the data (recorded in the run's config.yaml)."""
        return self if self.mode is not None else self.model_copy(update={"mode": self.mode_for(images)})

    def routing(self, images: bool) -> str:
        """The spatial LoRA routing actually used, given whether the data are images."""
        if self.mode == "coupled":
            return "shared"
        if self.spatial_lora == "auto":
            return "shared" if images else "per_video"
        return self.spatial_lora

    def with_model_defaults(self, defaults: ModelDefaults) -> TrainConfig:
        """Unset data geometry and validation settings taken from the base model (recorded in the run's
        config.yaml, so a resumed or replayed run uses the same values)."""
        update: dict[str, Any] = {"validation": self.validation.with_model_defaults(defaults)}
        if self.timesteps.high_share is None:
            update["timesteps"] = self.timesteps.model_copy(update={"high_share": defaults.timestep_high_share})
        if isinstance(self.data, DatasetSpec):
            update["data"] = self.data.with_model_defaults(defaults)
        return self.model_copy(update=update)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` pairs (values parsed as YAML) set into a copy of `data`."""
    result = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. optimizer.lr=1e-4")
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({error})") from None
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _resolve_sources(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make relative local data sources absolute against `folder` (the run's config.yaml works from anywhere)."""
    section = data.get("data")
    if not isinstance(section, dict) or "sources" not in section:
        return data
    sources = section["sources"]
    listed = [sources] if isinstance(sources, str) else sources
    if not isinstance(listed, list):
        return data  # pydantic reports the type error
    resolved = [normalize(s, relative_to=folder) if isinstance(s, str) else s for s in listed]
    return {**data, "data": {**section, "sources": resolved}}


def validate_config(data: Any, source: str) -> TrainConfig:
    """Validate a parsed config mapping; errors name `source` and every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe_validation_error(error, TrainConfig)}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply `--set key=value` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    # Sources in the file are relative to the file; sources given with --set, to the working directory.
    data = _resolve_sources(apply_overrides(_resolve_sources(data, path.resolve().parent), overrides), Path.cwd())
    source = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
    return validate_config(data, source)
