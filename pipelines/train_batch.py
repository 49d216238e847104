"""Batch training on Ray: many motion-LoRA jobs, each a Ray Train V2 TorchTrainer run of the library's train().

Driver (`run_batch`): jobs already registered in the catalog with the same idempotency key are
skipped; the rest are launched as Ray tasks (`_fit_job`, no resources of their own) that each
build and fit one TorchTrainer, as many at a time as the cluster's CPUs/GPUs hold given each job's
`workers x (cpus_per_job, gpus_per_job)` and `max_concurrent`. Fractional GPUs pack several small
jobs on one device.

Worker (`_train_job`, one per Ray Train worker): loads the base model, restores the job's last
reported checkpoint (`ray.train.get_checkpoint()`) into a fresh local run folder, and calls the
library's `train(..., resume=True)`; an observer reports every checkpoint the library writes with
`ray.train.report` (persisted to `<storage>/<job id>/`) and streams steps and losses to a small
progress actor the CLI's live table reads. Rank 0 registers the finished run's LoRAs in the
catalog with the job's lineage. A worker killed mid-job is restarted by Ray Train
(`FailureConfig(max_failures)`) from that checkpoint; killing the driver and re-running the same
spec resumes unfinished jobs from `<storage>` (same run names) and skips registered ones.

Orchestration only: training, packages, checkpoints and the catalog are the library's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import ray

from pipelines.batch_spec import BatchSpec, Job, code_version

KEY_TAG = "batch-key:"  # catalog tag holding a job's idempotency key
DEFAULT_STORAGE = "runs/batch"
STATES = ("queued", "running", "done", "skipped", "failed")


# --- storage -------------------------------------------------------------------------------------

def storage_uri(storage: str | None) -> str:
    """Local paths become absolute (Ray Train needs that); URIs stay as given."""
    storage = storage or DEFAULT_STORAGE
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _ray_storage(storage: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: s3/gs natively, other fsspec filesystems wrapped."""
    scheme = storage.split("://", 1)[0] if "://" in storage else ""
    if scheme in ("", "file", "s3", "gs", "gcs"):
        return storage.removeprefix("file://"), None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(storage)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _join(storage: str, *parts: str) -> str:
    return "/".join([storage.rstrip("/"), *parts])


def write_json_atomic(uri: str, payload: Any) -> None:
    """A reader sees the whole file or none: temp name + rename locally, one PUT on object stores."""
    data = json.dumps(payload, indent=2, default=str).encode()
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        from motiondirector.lora.package import atomic_write_bytes

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), data)
    else:
        fs.pipe_file(path, data)


# --- progress ------------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class ProgressBoard:
    """What the jobs report while they run (the CLI's live table polls `snapshot`)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, dict[int, str]] = {}

    def update(self, job_id: str, values: dict[str, Any]) -> None:
        self.jobs.setdefault(job_id, {}).update(values)

    def rank_digest(self, job_id: str, rank: int, digest: str) -> None:
        self.digests.setdefault(job_id, {})[rank] = digest

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {job: {**values, **({"rank_digests": self.digests[job]} if job in self.digests else {})}
                for job, values in self.jobs.items()}


# --- the worker ----------------------------------------------------------------------------------

def _lora_digest(groups: dict[str, list[Any]]) -> str:
    """sha256 over every adapter's weights, in name order (equal on all ranks when data parallel works)."""
    digest = hashlib.sha256()
    for name in sorted(groups):
        digest.update(name.encode())
        for param in groups[name]:
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _registered(catalog_uri: str | None, key: str) -> list[str]:
    if not catalog_uri:
        return []
    from motiondirector.catalog import Catalog

    return [m.id for m in Catalog(catalog_uri).query(tags=[KEY_TAG + key])]


def _with_preview(config: Any, job: dict[str, Any], backbone: Any) -> Any:
    """Sample one preview at the last step (validation section), with the model's defaults where the
    spec set nothing."""
    if not job["preview"]:
        return config
    validation = config.validation
    updates: dict[str, Any] = {}
    if not validation.every:
        updates["every"] = config.steps
    if job["preview_prompt"] and not validation.prompts:
        updates["prompts"] = [job["preview_prompt"]]
    defaults = dict(getattr(backbone, "defaults", None) or {})
    explicit = set(job["validation_keys"])
    mapping = {"frames": "frames", "steps": "steps", "guidance": "guidance", "fps": "fps"}
    for ours, theirs in mapping.items():
        if ours not in explicit and theirs in defaults:
            updates[ours] = defaults[theirs]
    if "size" not in explicit and "height" in defaults and "width" in defaults:
        updates["size"] = (defaults["height"], defaults["width"])
    if not updates:
        return config
    return config.model_copy(update={"validation": validation.model_copy(update=updates)})


class _Reporter:
    """The library's observer inside a Ray Train worker: checkpoints -> ray.train.report, steps -> board."""

    def __init__(self, job: dict[str, Any], rank: int, world_size: int, board: Any, storage: str,
                 restored: int | None) -> None:
        self.job, self.rank, self.world_size, self.board = job, rank, world_size, board
        self.storage = storage
        self.losses: dict[str, float] = {}
        self.reported: set[int] = {restored} if restored is not None else set()
        self.config = job["config"]

    def _kill_if_asked(self, step: int) -> None:
        """Test hook: SIGKILL this worker once, after step `kill_at_step` (marker in the job's storage)."""
        if self.job["kill_at_step"] != step or self.rank != 0:
            return
        marker = _join(self.storage, self.job["job_id"], ".fault-injected")
        fs, path = fsspec.core.url_to_fs(marker)
        if fs.exists(path):
            return
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, str(step).encode())
        # A report is registered when the controller polls the worker; wait for that, so the kill
        # tests recovery from the last *registered* checkpoint rather than racing the poll.
        from ray.train import get_all_reported_checkpoints

        get_all_reported_checkpoints()
        os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, event: Any) -> None:
        from ray.train import Checkpoint, report

        from motiondirector.events import CheckpointWritten, TrainStarted, TrainStep

        if isinstance(event, TrainStarted) and self.rank == 0:
            self.board.update.remote(self.job["job_id"], {"state": "running", "step": event.start_step,
                                                          "steps": event.total_steps,
                                                          "resumed_from": event.start_step or None})
        elif isinstance(event, TrainStep):
            self.losses = dict(event.losses)
            if self.rank == 0:
                self.board.update.remote(self.job["job_id"], {"state": "running", "step": event.step,
                                                              "steps": event.total_steps, "losses": self.losses,
                                                              "it_s": event.steps_per_second})
            self._kill_if_asked(event.step)
        elif isinstance(event, CheckpointWritten) and event.step not in self.reported:
            self.reported.add(event.step)
            checkpoint = None
            if event.path is not None and Path(event.path).is_dir():
                checkpoint = Checkpoint.from_directory(str(event.path))
            report({"step": event.step, **self.losses}, checkpoint=checkpoint,
                   checkpoint_dir_name=f"step-{event.step}", delete_local_checkpoint_after_upload=False)


def _restore(checkpoint: Any, run_dir: Path, config: Any) -> int:
    """The job's last reported checkpoint -> run_dir/checkpoints/step-<n> + config.yaml; returns n."""
    from motiondirector.train.layout import RunLayout

    step = int(Path(checkpoint.path).name.removeprefix("step-"))  # reported as checkpoint_dir_name=step-<n>
    layout = RunLayout(run_dir)
    checkpoint.to_directory(str(layout.checkpoint(step).root))
    layout.config.write_text(config.to_yaml())
    return step


def _call_train(train: Callable[..., Any], config: Any, run_dir: Path, *, observers: list[Any], rank: int,
                world_size: int, **kwargs: Any) -> Any:
    """TEMPORARY until the rank-aware train(observers=, rank=, world_size=) of branch `core` lands:
    emulate its events from on_step (one worker only)."""
    import inspect

    if "observers" in inspect.signature(train).parameters:
        return train(config, run_dir, observers=observers, rank=rank, world_size=world_size, **kwargs)
    if world_size != 1:
        raise RuntimeError("data-parallel jobs need the rank-aware train() (branch core)")
    from motiondirector.events import CheckpointWritten, TrainStep, emit
    from motiondirector.train.layout import RunLayout

    layout, began, first = RunLayout(run_dir), time.perf_counter(), [None]

    def pending_checkpoints() -> None:
        for step in layout.checkpoint_steps():
            emit(observers, CheckpointWritten(step, layout.checkpoint(step).root))

    def on_step(step: int, entry: dict[str, Any]) -> None:
        first[0] = first[0] if first[0] is not None else step - 1
        pending_checkpoints()
        losses = {k: v for k, v in entry.items() if k.startswith("loss_")}
        rate = (step - first[0]) / max(time.perf_counter() - began, 1e-9)
        emit(observers, TrainStep(step, config.steps, losses, rate, entry))

    summary = train(config, run_dir, progress=False, on_step=on_step, **kwargs)
    pending_checkpoints()
    return summary


def _train_job(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function: one rank of one job."""
    import ray.train

    from motiondirector.backbones import (
        ModelNotAvailableError,
        ModelTooLargeError,
        load_backbone,
        resolve_device,
    )
    from motiondirector.config import validate_config
    from motiondirector.train.engine import make_engine
    from motiondirector.train.loop import train

    job, board, storage = loop_config["job"], loop_config["board"], loop_config["storage"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    existing = _registered(loop_config["catalog"], job["key"])
    if existing:  # a previous attempt registered it and died before reporting
        return {"catalog_ids": existing, "skipped": True}
    config = validate_config(job["config"], f"job {job['name']}")
    if loop_config["use_gpu"] and config.device == "auto":
        config = config.model_copy(update={"device": "cuda"})
    workdir = Path(tempfile.mkdtemp(prefix=f"motiondirector-{job['job_id']}-rank{rank}-"))
    try:
        try:
            backbone = load_backbone(config.base, resolve_device(config.device))
        except (ModelNotAvailableError, ModelTooLargeError) as error:
            return {"error": f"{type(error).__name__}: {error}"}  # the same on every attempt: no retry
        config = _with_preview(config, job, backbone)
        run_dir = workdir / "run"
        checkpoint = ray.train.get_checkpoint()
        resumed = _restore(checkpoint, run_dir, config) if checkpoint is not None else None
        engine = make_engine(config.engine)
        reporter = _Reporter(job, rank, world_size, board, storage, resumed)
        began = time.perf_counter()
        try:
            summary = _call_train(train, config, run_dir, resume=resumed is not None, backbone=backbone,
                                  engine=engine, observers=[reporter], rank=rank, world_size=world_size)
        except (ValueError, FileNotFoundError) as error:  # bad data or config: deterministic, no retry
            return {"error": f"{type(error).__name__}: {error}"}
        seconds = time.perf_counter() - began
        digest = _lora_digest(engine.groups)
        board.rank_digest.remote(job["job_id"], rank, digest)
        result = {"summary": summary.to_json(), "resumed_from": resumed, "digest": digest,
                  "steps_per_second": (config.steps - (resumed or 0)) / max(seconds, 1e-9), "catalog_ids": []}
        if rank == 0 and loop_config["catalog"]:
            result["catalog_ids"] = _register(loop_config["catalog"], run_dir, job, loop_config["batch_id"])
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _register(catalog: str, run_dir: Path, job: dict[str, Any], batch_id: str) -> list[str]:
    """The finished run's LoRAs (temporal + spatial, preview gif) under one run id, tagged with the job's key."""
    from motiondirector.catalog import Catalog, register_run

    lineage = job["lineage"]
    code = lineage["code_version"]
    description = (f"train-batch job {job['name']}: dataset {job['dataset']}, spec sha256 "
                   f"{lineage['spec_sha256'][:12]}, code {code.get('package')}"
                   + (f"@{code['git'][:10]}" if "git" in code else ""))
    manifests = register_run(Catalog(catalog), run_dir, name=job["name"], description=description,
                             tags=[KEY_TAG + job["key"], f"batch:{batch_id}", f"job:{job['name']}"])
    return [m.id for m in manifests]


# --- one job = one TorchTrainer ------------------------------------------------------------------

@ray.remote(num_cpus=0, max_retries=0)
def _fit_job(job: dict[str, Any], resources: dict[str, Any], storage: str, catalog: str | None, batch_id: str,
             board: Any) -> dict[str, Any]:
    """Build and fit one job's TorchTrainer; returns its outcome (never raises for a failed job)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    began = time.perf_counter()
    use_gpu = resources["gpus_per_job"] > 0
    per_worker = {"CPU": resources["cpus_per_job"], **({"GPU": resources["gpus_per_job"]} if use_gpu else {})}
    storage_path, filesystem = _ray_storage(storage)
    trainer = TorchTrainer(
        _train_job,
        train_loop_config={"job": job, "board": board, "storage": storage, "catalog": catalog,
                           "batch_id": batch_id, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=resources["workers"], use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=job["job_id"], storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=resources["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    board.update.remote(job["job_id"], {"state": "running"})
    try:
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - a failed job is reported, the batch goes on
        cause = getattr(error, "__cause__", None) or error
        message = f"{type(cause).__name__}: {cause}".strip()
        board.update.remote(job["job_id"], {"state": "failed", "error": message})
        return {"state": "failed", "error": message, "seconds": time.perf_counter() - began}
    outcome = dict(result.return_value or {})
    state = "failed" if outcome.get("error") else "skipped" if outcome.get("skipped") else "done"
    board.update.remote(job["job_id"], {"state": state, **({"error": outcome["error"]} if outcome.get("error")
                                                            else {})})
    return {"state": state, "seconds": time.perf_counter() - began, **outcome}


# --- the driver ----------------------------------------------------------------------------------

@dataclass
class JobOutcome:
    job: Job
    state: str = "queued"
    catalog_ids: list[str] = field(default_factory=list)
    error: str | None = None
    resumed_from: int | None = None
    seconds: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    steps_per_second: float | None = None
    rank_digests: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.job.name, "job_id": self.job.job_id, "key": self.job.key, "state": self.state,
                "dataset": self.job.dataset, "catalog_ids": self.catalog_ids, "error": self.error,
                "resumed_from": self.resumed_from, "seconds": self.seconds, "losses": self.losses,
                "steps_per_second": self.steps_per_second,
                "rank_digests": {str(k): v for k, v in sorted(self.rank_digests.items())},
                "steps": self.job.config["steps"], "workers": self.job.resources.workers,
                "lineage": self.job.lineage}


def new_batch_id(spec: BatchSpec) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{spec.sha256[:8]}"


def _already_registered(catalog_uri: str | None, jobs: list[Job]) -> dict[str, list[str]]:
    """key -> catalog ids of the jobs whose LoRAs are registered already (one catalog query)."""
    if not catalog_uri:
        return {}
    from motiondirector.catalog import Catalog

    found: dict[str, list[str]] = {}
    wanted = {KEY_TAG + job.key: job.key for job in jobs}
    for manifest in Catalog(catalog_uri).query(limit=None):
        for tag in manifest.tags:
            if tag in wanted:
                found.setdefault(wanted[tag], []).append(manifest.id)
    return found


def _demand(job: Job) -> dict[str, float]:
    r = job.resources
    return {"CPU": r.workers * r.cpus_per_job, "GPU": r.workers * r.gpus_per_job}


def _fits(demand: dict[str, float], free: dict[str, float]) -> bool:
    return all(demand[k] <= free.get(k, 0.0) + 1e-9 for k in demand if demand[k] > 0)


def run_batch(spec: BatchSpec, *, batch_id: str | None = None,
              on_update: Callable[[dict[str, Any]], None] | None = None, poll_seconds: float = 0.5) -> dict[str, Any]:
    """Train every job of `spec` not yet in the catalog; returns (and writes) the batch report."""
    storage = storage_uri(spec.storage)
    batch_id = batch_id or new_batch_id(spec)
    started = datetime.now(UTC)
    outcomes = {job.job_id: JobOutcome(job) for job in spec.jobs}
    for key, ids in _already_registered(spec.catalog, spec.jobs).items():
        for outcome in outcomes.values():
            if outcome.job.key == key:
                outcome.state, outcome.catalog_ids = "skipped", ids
    pending = [o.job for o in outcomes.values() if o.state == "queued"]

    def snapshot(live: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        live = live or {}
        jobs = []
        for job_id, outcome in outcomes.items():
            row = outcome.as_dict()
            row.pop("lineage")
            values = live.get(job_id, {})
            if outcome.state in ("queued", "running"):
                row.update({k: v for k, v in values.items() if k in ("step", "steps", "losses", "it_s")})
                row["state"] = "running" if values.get("state") == "running" else outcome.state
            else:
                row.update({k: v for k, v in values.items() if k in ("step", "steps")})
            row.setdefault("steps", outcome.job.config["steps"])
            jobs.append(row)
        return {"batch_id": batch_id, "jobs": jobs}

    if pending:
        if not ray.is_initialized():
            ray.init()
        board = ProgressBoard.remote()
        total = ray.cluster_resources()
        capacity = {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0)}
        for job in pending:
            if not _fits(_demand(job), capacity):
                outcomes[job.job_id].state = "failed"
                outcomes[job.job_id].error = (f"needs {_demand(job)} but the cluster has {capacity} "
                                              "(resources: workers x cpus_per_job / gpus_per_job)")
        queue = [job for job in pending if outcomes[job.job_id].state == "queued"]
        cap = spec.resources.max_concurrent or math.inf
        running: dict[Any, Job] = {}
        free = dict(capacity)
        while queue or running:
            while queue and len(running) < cap and _fits(_demand(queue[0]), free):
                job = queue.pop(0)
                for k, v in _demand(job).items():
                    free[k] = free.get(k, 0.0) - v
                ref = _fit_job.remote(job.payload(), job.resources.model_dump(), storage, spec.catalog, batch_id, board)
                running[ref] = job
                outcomes[job.job_id].state = "running"
            if not running:  # nothing fits while nothing runs: cannot happen after the capacity check
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=poll_seconds)
            for ref in done:
                job = running.pop(ref)
                for k, v in _demand(job).items():
                    free[k] = free.get(k, 0.0) + v
                _finish(outcomes[job.job_id], ray.get(ref))
            if on_update is not None:
                on_update(snapshot(ray.get(board.snapshot.remote())))
        live = ray.get(board.snapshot.remote())
        for job_id, values in live.items():
            outcomes[job_id].rank_digests = {int(k): v for k, v in values.get("rank_digests", {}).items()}
        ray.kill(board)
    report = {
        "batch_id": batch_id, "spec": str(spec.path), "spec_sha256": spec.sha256, "storage": storage,
        "catalog": spec.catalog, "code_version": code_version(), "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "counts": {state: sum(o.state == state for o in outcomes.values()) for state in STATES},
        "jobs": [o.as_dict() for o in outcomes.values()],
    }
    report["report"] = _join(storage, "batches", batch_id, "report.json")
    write_json_atomic(report["report"], report)
    if on_update is not None:
        on_update(snapshot())
    return report


def _finish(outcome: JobOutcome, result: dict[str, Any]) -> None:
    outcome.state = result["state"]
    outcome.error = result.get("error")
    outcome.seconds = round(result.get("seconds", 0.0), 3)
    outcome.catalog_ids = list(result.get("catalog_ids", []))
    outcome.resumed_from = result.get("resumed_from")
    outcome.steps_per_second = result.get("steps_per_second")
    outcome.losses = dict((result.get("summary") or {}).get("losses", {}))
