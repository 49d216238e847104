"""The training loop: dual-path LoRA training as a library function (no Ray, no globals).

`train(config, out_dir)` loads the base model and the dataset's cache records (or takes them),
injects the adapters (train/plan.py), runs the steps (train/step.py) through an engine
(train/engine.py) and writes the run folder (train/layout.py, docs/run-folder.md). Reproducible:
every random draw of a step comes from streams derived from (`config.seed`, draw slot, step)
(train/ranks.py), so the same config, seed, world size and thread count give bit-identical LoRA
weights, and resuming from a checkpoint gives the same final weights as an uninterrupted run.
SIGINT/SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`.

Data parallel: in a torch.distributed world every rank calls train() with the same config; each
rank draws from its own streams and its shard of the records, the engine averages the gradients
over all ranks' draws, and only rank 0 reads and writes the run folder (its decisions, checkpoint
and summary are broadcast). A failure on one rank leaves the others waiting in a collective: the
launcher (torchrun, Ray Train) must tear the group down. Progress is reported to observers (motiondirector/events.py): TrainStarted,
a TrainStep after every step, CheckpointWritten, ValidationSample, TrainFinished; the loop itself
draws nothing and writes no TensorBoard events (the CLI attaches those, commands/observers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from motiondirector.backbones import defaults_for, load_backbone, resolve_device
from motiondirector.backbones.base import BackboneSpec
from motiondirector.config import ConfigError, TrainConfig, validate_config
from motiondirector.data.records import CacheRecord
from motiondirector.events import (
    CheckpointWritten,
    Observer,
    TrainFinished,
    TrainStarted,
    TrainStep,
    ValidationSample,
    emit,
    progress_callback,
)
from motiondirector.lora.inject import Router
from motiondirector.lora.package import BaseModelRef, Manifest
from motiondirector.noise_prior import initial_noise, noise_prior_latents
from motiondirector.sample import sample_videos
from motiondirector.storage import atomic_write
from motiondirector.train.checkpoint import (
    load_packages,
    read_training_state,
    write_checkpoint,
    write_packages,
)
from motiondirector.train.engine import AdapterGradients, DrawCounts, Engine, flat_groups, make_engine
from motiondirector.train.guard import DivergenceGuard, TimestepSampler, TrainingDiverged
from motiondirector.train.layout import RunLayout
from motiondirector.train.plan import AdapterPlan, AdapterSpec, installed_adapters, plan_adapters
from motiondirector.train.ranks import Ranks, draw_generator, resolve_ranks, seed_dropout, shard, shard_group
from motiondirector.train.step import clip_tensors, draw_step, step_gradients
from motiondirector.video_io import write_gif, write_video

# Config keys that may differ when resuming: they do not change the weights a step produces.
RESUMABLE_CHANGES = frozenset({"steps", "device", "log_every", "checkpoint_every", "validation", "cache_dir",
                               "divergence"})
_LOSS_WINDOW = 20  # manifests report each loss as the mean over its last N values


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (exists, not a run folder, incompatible resume)."""


class TrainingInterrupted(Exception):  # noqa: N818 - it is a signal-driven stop, not an error
    """SIGINT/SIGTERM stopped training after a complete step; `checkpoint` holds that step."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"training interrupted after step {step}; checkpoint written to {checkpoint} "
                         f"(continue with --resume)")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class RunSummary:
    out_dir: str
    steps: int
    resumed_from: int | None
    mode: str
    routing: str
    losses: dict[str, float]
    packages: dict[str, Any]  # {"temporal": folder | None, "spatial": [folder, ...]}
    checkpoints: list[int]
    samples: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- precision and devices ------------------------------------------------------------------------

def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. auto: bf16 on GPUs that have it, else fp16; fp32 on CPU."""
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def _autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _rng_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


# --- the run folder -----------------------------------------------------------------------------

def _comparable(config: TrainConfig, mode_unset: bool) -> dict[str, Any]:
    """What must not change on --resume. An unset mode follows the data (known only once the records are
    loaded): it is compared with the previous run's by `check_resumed_mode`."""
    skip = RESUMABLE_CHANGES | ({"mode"} if mode_unset else set())
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in skip}


def check_resumed_mode(layout: RunLayout, config: TrainConfig) -> None:
    """A resumed run whose mode came from the data must get the mode the run folder trained in."""
    previous = validate_config(yaml.safe_load(layout.config.read_text()), str(layout.config))
    if previous.mode != config.mode:
        raise RunFolderError(f"{layout.root}: cannot --resume with a different config; changed: mode "
                             f"({previous.mode} in {layout.config.name}, {config.mode} from the data)")


def prepare_run_folder(layout: RunLayout, config: TrainConfig, *, resume: bool, overwrite: bool) -> int | None:
    """Check/clear OUT; returns the checkpoint step to resume from (None: start at step 0)."""
    root = layout.root
    if not root.exists() or not any(root.iterdir()):
        return None
    is_run = layout.config.exists()
    if overwrite:
        if not is_run:
            raise RunFolderError(f"{root}: refusing to --overwrite a non-empty folder that is not a run folder "
                                 f"(no {layout.config.name})")
        shutil.rmtree(root)
        return None
    if not resume:
        raise RunFolderError(f"{root}: exists and is not empty; pass --resume to continue it or --overwrite to "
                             "replace it")
    if not is_run:
        raise RunFolderError(f"{root}: cannot --resume, it is not a run folder (no {layout.config.name})")
    try:
        previous = validate_config(yaml.safe_load(layout.config.read_text()), str(layout.config))
    except ConfigError as error:
        raise RunFolderError(f"cannot --resume: {error}") from None
    mode_unset = config.mode is None
    before, now = _comparable(previous, mode_unset), _comparable(config, mode_unset)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        raise RunFolderError(f"{root}: cannot --resume with a different config; changed: {', '.join(changed)} "
                             f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    steps = layout.checkpoint_steps()
    if steps and steps[-1] > config.steps:
        raise RunFolderError(f"{root}: the last checkpoint is at step {steps[-1]}, beyond steps={config.steps}")
    return steps[-1] if steps else None


def _keep_metrics_until(path: Path, step: int) -> None:
    """A resumed run rewrites metrics after its checkpoint: drop lines logged after it."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash mid-write
    atomic_write(path, "".join(line + "\n" for line in kept).encode())


# --- records -------------------------------------------------------------------------------------

def load_training_records(config: TrainConfig, backbone: BackboneSpec,
                          observers: Sequence[Observer] = ()) -> list[CacheRecord]:
    """The data section -> cache records (encoded once and cached; see docs/data.md), or a `dataset:`
    reference's committed ingest output (docs/ingest.md: no VAE in the loop)."""
    from motiondirector.data.cache import load_records
    from motiondirector.data.reference import DatasetReference

    if isinstance(config.data, DatasetReference):
        return config.data.load(vae_id=backbone.vae_id)

    return load_records(config.data, backbone, cache_dir=config.cache_dir, observers=observers)


def check_records(records: list[CacheRecord], backbone: BackboneSpec) -> None:
    if not records:
        raise ValueError("the dataset gave no training clips")
    channels = backbone.unet.config.in_channels
    text_dim = backbone.unet.config.cross_attention_dim
    for record in records:
        if record.latent_mean.ndim != 4 or record.latent_mean.shape[0] != channels:
            raise ValueError(f"{record.video_path} (clip {record.clip_index}): latents of shape "
                             f"{tuple(record.latent_mean.shape)}, the base model needs ({channels}, F, h, w)")
        if record.latent_std.shape != record.latent_mean.shape:
            raise ValueError(f"{record.video_path} (clip {record.clip_index}): latent std and mean shapes differ")
        if record.text_embedding.ndim != 2 or record.text_embedding.shape[1] != text_dim:
            raise ValueError(f"{record.video_path} (clip {record.clip_index}): text embedding of shape "
                             f"{tuple(record.text_embedding.shape)}, the base model needs (L, {text_dim})")


# --- bookkeeping ----------------------------------------------------------------------------------

@dataclass
class _Tracker:
    """Recent losses per key and update counts per adapter (checkpointed, so manifests resume exactly)."""

    recent: dict[str, deque[float]] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.recent.setdefault(key, deque(maxlen=_LOSS_WINDOW)).append(value)

    def mean(self, key: str) -> float | None:
        values = self.recent.get(key)
        return sum(values) / len(values) if values else None

    def state_dict(self) -> dict[str, Any]:
        return {"recent": {k: list(v) for k, v in self.recent.items()}, "updates": dict(self.updates)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Tracker:
        return cls({k: deque(v, maxlen=_LOSS_WINDOW) for k, v in state["recent"].items()}, dict(state["updates"]))


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the event (the loop stops after the current step); a second one aborts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signals are only delivered to the main thread (e.g. not inside a Ray actor thread)
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum: int, frame: object) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the run --------------------------------------------------------------------------------------

class _Run:
    """State of one train() call; methods are the loop's phases."""

    def __init__(self, config: TrainConfig, layout: RunLayout, backbone: BackboneSpec, records: list[CacheRecord],
                 plan: AdapterPlan, engine: Engine, amp_dtype: torch.dtype | None,
                 observers: Sequence[Observer], ranks: Ranks) -> None:
        self.config, self.layout, self.backbone, self.records = config, layout, backbone, records
        self.plan, self.engine, self.observers, self.ranks = plan, engine, tuple(observers), ranks
        self.device = backbone.device
        self.autocast = _autocast_factory(self.device, amp_dtype)
        self.tracker = _Tracker()
        self.prior: torch.Tensor | None = None  # the validation noise prior (prepare_validation)
        divergence = config.divergence
        self.guard = DivergenceGuard(divergence.factor, divergence.window, divergence.enabled,
                                     hint=f"; lower optimizer.lr (now {config.optimizer.lr:g}) or lora.rank (now "
                                          f"{config.lora.rank}), or set divergence.enabled: false")
        self.router = Router(backbone.unet)  # after the adapters were installed
        self.paths = plan.parameter_paths(backbone.unet)
        self.groups = flat_groups(self.paths)

    # manifests ---------------------------------------------------------------------------------
    def fingerprints(self, adapter: AdapterSpec) -> list[str]:
        return list(dict.fromkeys(self.records[i].latent_fingerprint for i in adapter.records))

    def manifest(self, adapter: AdapterSpec, step: int) -> Manifest:
        config = self.config
        records = [self.records[i] for i in adapter.records]
        if adapter.kind == "temporal":
            keys = {"temporal": "loss_temporal", "org": "loss_org", "ad": "loss_ad"}
        else:
            keys = {"spatial": f"loss_{adapter.name}"}
        losses = {name: value for name, key in keys.items() if (value := self.tracker.mean(key)) is not None}
        concept = config.data.concept or next((r.concept for r in records if r.concept), None)
        return Manifest(
            kind=adapter.kind, base=BaseModelRef(model_id=self.backbone.model_id,
                                                 architecture=self.backbone.architecture_fingerprint),
            rank=config.lora.rank, alpha=config.lora.settings.effective_alpha, targets=list(adapter.targets),
            mode=config.mode,
            training_config={**config.model_dump(mode="json"), "lora_dropout": config.lora.dropout,
                             "routing": self.plan.routing},
            data_fingerprints=self.fingerprints(adapter),
            captions=list(dict.fromkeys(r.caption for r in records)), concept=concept, step=step, losses=losses,
            metrics={"updates": float(self.tracker.updates.get(adapter.name, 0))})

    def write_packages(self, layout: RunLayout, step: int) -> dict[str, Path]:
        return write_packages(layout, self.backbone.unet, self.plan, lambda adapter: self.manifest(adapter, step))

    # state ---------------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """No RNG state: every draw derives from (seed, slot, step). Called on every rank (the engine may gather)."""
        return {"step": step, "world_size": self.ranks.world_size, "engine": self.engine.state_dict(),
                "tracker": self.tracker.state_dict(), "guard": self.guard.state_dict()}

    def restore(self, step: int) -> dict[str, Any]:
        """Weights and bookkeeping of checkpoint `step`, read by rank 0 and given to every rank; returns
        the engine's state for after prepare()."""
        def read() -> dict[str, Any]:
            checkpoint = self.layout.checkpoint(step)
            load_packages(checkpoint, self.backbone.unet, self.plan, self.fingerprints)
            return read_training_state(checkpoint)

        state = self.ranks.on_main(read)
        self.ranks.broadcast_parameters([p for params in self.groups.values() for p in params])
        self.tracker = _Tracker.from_state(state["tracker"])
        if "guard" in state:  # checkpoints written before the guard existed start it afresh
            self.guard.load_state_dict(state["guard"])
        return state["engine"]

    def checkpoint(self, step: int) -> Path:
        state = self.state_dict(step)
        if not self.ranks.is_main:
            return self.layout.checkpoint(step).root
        path = write_checkpoint(self.layout, step, lambda layout: self.write_packages(layout, step), state)
        emit(self.observers, CheckpointWritten(step, path))
        return path

    # validation ------------------------------------------------------------------------------------
    def validation_prompts(self) -> list[str]:
        return self.config.validation.prompts or list(dict.fromkeys(r.caption for r in self.records))

    def validation_reference(self) -> str:
        """The noise prior's video: validation.reference, else the first training video."""
        reference = self.config.validation.reference
        if reference:
            return reference
        first = self.records[0]
        if first.is_image:
            raise ValueError("validation.noise_prior needs a video and the training data are images: set "
                             "validation.reference")
        return first.video_path

    def prepare_validation(self) -> None:
        """The noise prior of the validation samples (noise_prior.py's DDIM inversion, cached on disk), computed
        before the first step so that a bad reference fails at once; None without a prior."""
        validation = self.config.validation
        if not validation.every or validation.noise_prior == 0:
            return
        reference = self.validation_reference()
        with torch.random.fork_rng(devices=_rng_devices(self.device)), torch.no_grad(), self.autocast():
            self.prior = noise_prior_latents(self.backbone, reference, frames=validation.frames,
                                             size=validation.size, fps=validation.fps,
                                             cache_dir=self.config.cache_dir,
                                             on_step=progress_callback(self.observers, "noise_prior", reference))

    def validate(self, step: int) -> None:
        """Sample with the inference routing; isolated from the training RNG so it never changes the run.
        Prompt i starts from the noise of seed `validation.seed + i`, mixed with the prior if one is set."""
        validation = self.config.validation
        settings = validation.sampling
        unet = self.backbone.unet
        with torch.random.fork_rng(devices=_rng_devices(self.device)), \
                self.router.active(self.plan.inference_adapters(self.config.mode)), self.autocast():
            unet.eval()  # no LoRA dropout while sampling
            try:
                for index, prompt in enumerate(self.validation_prompts()):
                    noise = initial_noise(self.backbone, settings, validation.seed + index, self.prior,
                                          validation.noise_prior)
                    frames = sample_videos(self.backbone, [prompt], settings, initial_noise=noise)[0]
                    stem = self.layout.samples / f"step-{step}-{index}"
                    files = {"mp4": write_video(frames, stem.with_suffix(".mp4"), fps=validation.fps),
                             "gif": write_gif(frames, stem.with_suffix(".gif"), fps=validation.fps)}
                    emit(self.observers, ValidationSample(step, prompt, files))
            finally:
                unet.train()

    # steps -------------------------------------------------------------------------------------------
    def slots(self) -> list[int]:
        """This rank's draw slots: rank × accumulation + j (train/ranks.py)."""
        accumulation = self.config.gradient_accumulation
        return [self.ranks.rank * accumulation + j for j in range(accumulation)]

    def run(self, start: int) -> None:
        config, ranks = self.config, self.ranks
        slots, total_slots = self.slots(), ranks.world_size * config.gradient_accumulation
        groups = [shard_group(i, "weight" in r.extra, r.video_index) for i, r in enumerate(self.records)]
        shards = {slot: shard(groups, slot, total_slots) for slot in slots}
        # Only this rank's clips go to the device.
        clips = {i: clip_tensors(self.records[i], self.device) for i in sorted(set().union(*shards.values()))}
        shapes = {i: (1, *self.records[i].latent_mean.shape) for i in clips}
        # Records carry a sampling weight where the data layer split one source into weighted variants.
        weights = {i: float(self.records[i].extra.get("weight", 1.0)) for i in clips}
        skip_probability = config.spatial_skip_probability if config.mode.startswith("dual_path") else 0.0
        num_timesteps = self.backbone.scheduler.config.num_train_timesteps
        timesteps = TimestepSampler(num_timesteps, config.timesteps.high_share, config.timesteps.high_from)
        emit(self.observers, TrainStarted(str(self.layout.root), start, config.steps, ranks.rank, ranks.world_size))
        metrics_file = contextlib.nullcontext(None)
        if ranks.is_main:
            _keep_metrics_until(self.layout.metrics, start)
            metrics_file = open(self.layout.metrics, "a", encoding="utf-8")  # noqa: SIM115 - closed by the with
        began = time.perf_counter()
        with _stop_requests() as stop, metrics_file as metrics:
            for step in range(start + 1, config.steps + 1):
                sums: AdapterGradients = {}
                counts: DrawCounts = {}
                draws, losses = [], []
                for slot in slots:
                    positions = shards[slot]
                    draw = draw_step(draw_generator(config.seed, slot, step), [shapes[i] for i in positions],
                                     num_timesteps, skip_probability,
                                     torch.tensor([weights[i] for i in positions], dtype=torch.float64),
                                     timesteps=timesteps)
                    draw = dataclasses.replace(draw, record=positions[draw.record])
                    seed_dropout(config.seed, slot, step)  # LoRA dropout draws from torch's global RNG
                    result = step_gradients(self.backbone, self.plan, self.router, self.groups, config.mode,
                                            clips[draw.record], draw, ad_beta=config.ad_beta,
                                            loss_scale=self.engine.scaler.scale, autocast=self.autocast)
                    for adapter, grads in result.grads.items():
                        sums[adapter] = grads if adapter not in sums else \
                            [a + b for a, b in zip(sums[adapter], grads, strict=True)]
                        counts[adapter] = counts.get(adapter, 0) + 1
                    draws.append(draw)
                    losses.append(result.losses)
                updated = self.engine.step(sums, counts)
                scalars = self.track(draws, losses, updated)
                diverged = self.guard.observe(step, scalars)
                if self.guard.enabled and ranks.any(diverged is not None):  # every rank stops together
                    raise diverged or TrainingDiverged(f"training diverged at step {step} on another rank",
                                                       step=step, loss="")
                entry = {"step": step, **scalars, **self.describe(draws), "updated": updated,
                         "seconds": round(time.perf_counter() - began, 4)}
                if metrics is not None and (step % config.log_every == 0 or step == config.steps):
                    metrics.write(json.dumps(entry) + "\n")
                    metrics.flush()
                rate = (step - start) / max(time.perf_counter() - began, 1e-9)
                emit(self.observers, TrainStep(step, config.steps, dict(scalars), rate, entry))
                stopping = ranks.any(stop.is_set()) and step < config.steps
                if stopping or step == config.steps or (config.checkpoint_every
                                                        and step % config.checkpoint_every == 0):
                    path = self.checkpoint(step)
                if stopping:
                    raise TrainingInterrupted(step, path)
                if ranks.is_main and config.validation.every and step % config.validation.every == 0:
                    self.validate(step)

    def track(self, draws: list, losses: list[dict[str, float]], updated: list[str]) -> dict[str, float]:
        """Record this rank's losses and the updates; returns each loss's mean over the draws computing it."""
        for draw, values in zip(draws, losses, strict=True):
            for key, value in values.items():
                self.tracker.add(key, value)
            if "loss_spatial" in values:
                self.tracker.add(f"loss_{self.plan.spatial_for(draw.record)}", values["loss_spatial"])
        for adapter in updated:
            self.tracker.updates[adapter] = self.tracker.updates.get(adapter, 0) + 1
        keys = sorted({key for values in losses for key in values})
        return {key: sum(v[key] for v in losses if key in v) / sum(key in v for v in losses) for key in keys}

    def describe(self, draws: list) -> dict[str, Any]:
        """The metrics entry's draw fields: values for one draw per step, lists (one per draw) otherwise."""
        fields = {"spatial_lora": [self.plan.spatial_of_record[d.record] for d in draws],
                  "record": [d.record for d in draws], "timestep": [d.timestep for d in draws],
                  "skip_spatial": [d.skip_spatial for d in draws]}
        return {key: values[0] for key, values in fields.items()} if len(draws) == 1 else fields


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          backbone: BackboneSpec | None = None, records: list[CacheRecord] | None = None,
          engine: Engine | None = None, observers: Sequence[Observer] = (), rank: int | None = None,
          world_size: int | None = None) -> RunSummary:
    """Train the config's LoRAs into the run folder `out_dir`; see the module doc.

    `backbone` / `records` skip loading the base model / encoding the dataset (their adapters are
    removed again afterwards, so one backbone can serve several runs). `engine` defaults to the
    config's (torch or DeepSpeed). `observers` receive the run's events (motiondirector/events.py),
    including Progress("cache", ...) while the dataset is encoded; an observer that raises stops the
    run there (without a checkpoint). `rank` / `world_size` default to torch.distributed's when it
    is initialised, else 0 / 1; every rank returns rank 0's summary.
    Raises TrainingInterrupted (checkpoint written) on SIGINT/SIGTERM, RunFolderError for an unusable
    OUT, ValueError for bad data, ModelNotAvailableError / ModelTooLargeError for the base model.
    """
    began = time.perf_counter()
    ranks = resolve_ranks(rank, world_size)
    config = config.with_model_defaults(backbone.defaults if backbone is not None else defaults_for(config.base))
    layout = RunLayout(Path(out_dir))
    start = ranks.on_main(lambda: prepare_run_folder(layout, config, resume=resume, overwrite=overwrite))
    device = backbone.device if backbone is not None else resolve_device(config.device)
    amp_dtype = autocast_dtype(config.mixed_precision, device)
    if backbone is None:
        # Frozen weights in the autocast precision on GPU (memory), fp32 on CPU.
        frozen = amp_dtype if device.type == "cuda" and amp_dtype is not None else torch.float32
        backbone = load_backbone(config.base, device, dtype=frozen)
    if records is None:
        records = load_training_records(config, backbone, observers)
    check_records(records, backbone)
    unset_mode = config.mode is None
    config = config.with_data_kind(images=all(r.is_image for r in records))
    if unset_mode and start is not None:
        ranks.on_main(lambda: check_resumed_mode(layout, config))
    plan = plan_adapters(config, records, backbone)
    engine = engine if engine is not None else make_engine(config.engine)
    if ranks.is_main:
        layout.root.mkdir(parents=True, exist_ok=True)
        atomic_write(layout.config, config.to_yaml().encode())
        layout.summary.unlink(missing_ok=True)  # the run is incomplete until it is rewritten

    unet = backbone.unet
    # fork_rng: LoRA dropout reseeds torch's global RNG every draw; the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=_rng_devices(device)), \
            installed_adapters(unet, plan, config.lora.settings, config.seed):
        if config.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        run = _Run(config, layout, backbone, records, plan, engine, amp_dtype, observers, ranks)
        # Weights before prepare(): DeepSpeed copies them into its fp32 partitions there.
        engine_state = run.restore(start) if start is not None else None
        engine.prepare(run.paths, config.optimizer, fp16_loss_scaling=amp_dtype == torch.float16, ranks=ranks)
        if engine_state is not None:
            engine.load_state_dict(engine_state)
        ranks.on_main(run.prepare_validation)
        was_training = unet.training
        unet.train()  # LoRA dropout on
        try:
            run.run(start or 0)
            summary = ranks.on_main(lambda: _finish(run, start, began))
        finally:
            unet.train(was_training)
    emit(observers, TrainFinished(str(layout.root), config.steps, dict(summary.losses), summary.seconds))
    return summary


def _finish(run: _Run, start: int | None, began: float) -> RunSummary:
    """Rank 0's end of a run: final packages, last validation, summary.json."""
    config, layout, plan = run.config, run.layout, run.plan
    packages = run.write_packages(layout, config.steps)
    if config.validation.every and config.steps % config.validation.every:
        run.validate(config.steps)
    summary = RunSummary(
        out_dir=str(layout.root), steps=config.steps, resumed_from=start, mode=config.mode, routing=plan.routing,
        losses={key: value for key in sorted(run.tracker.recent) if (value := run.tracker.mean(key)) is not None},
        packages={"temporal": str(packages["temporal"]) if "temporal" in packages else None,
                  "spatial": [str(packages[a.name]) for a in plan.spatial]},
        checkpoints=layout.checkpoint_steps(),
        samples=sorted(str(p) for p in layout.samples.glob("*")) if layout.samples.is_dir() else [],
        seconds=round(time.perf_counter() - began, 3))
    atomic_write(layout.summary, json.dumps(summary.to_json(), indent=2).encode())
    return summary
