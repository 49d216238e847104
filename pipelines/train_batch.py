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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
    """(storage_path, storage_filesystem) for RunConfig: local paths natively, every URI through fsspec.

    Object stores go through fsspec too (wrapped for pyarrow), so checkpoints use the same endpoint,
    credentials and options (`fsspec.config.conf`, `FSSPEC_<PROTOCOL>_*`) as the catalog and the ingest
    output -- e.g. an S3-compatible server that pyarrow's own S3 client would not find.
    """
    scheme = storage.split("://", 1)[0] if "://" in storage else ""
    if scheme in ("", "file"):
        return storage.removeprefix("file://"), None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(storage)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _join(storage: str, *parts: str) -> str:
    return "/".join([storage.rstrip("/"), *parts])


def write_json_atomic(uri: str, payload: Any) -> None:
    """A reader sees the whole file or none: temp name + rename locally, one PUT on object stores."""
    from motiondirector.api import publish

    publish(uri, json.dumps(payload, indent=2, default=str).encode())


# --- progress ------------------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class ProgressBoard:
    """What the jobs report while they run (the CLI's live table polls `snapshot`)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, dict[int, str]] = {}
        self.attempts: dict[str, list[dict[str, Any]]] = {}

    def update(self, job_id: str, values: dict[str, Any]) -> None:
        self.jobs.setdefault(job_id, {}).update(values)

    def attempt(self, job_id: str, values: dict[str, Any]) -> None:
        """Rank 0 of each (re)started worker group: the node it runs on and the step it resumed from."""
        self.attempts.setdefault(job_id, []).append(values)
        self.jobs.setdefault(job_id, {})["node_id"] = values["node_id"]

    def rank_digest(self, job_id: str, rank: int, digest: str) -> None:
        self.digests.setdefault(job_id, {})[rank] = digest

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {job: {**values, **({"rank_digests": self.digests[job]} if job in self.digests else {}),
                      **({"attempts": self.attempts[job]} if job in self.attempts else {})}
                for job, values in self.jobs.items()}


# --- the worker ----------------------------------------------------------------------------------

def lora_digest(unet: Any) -> str:
    """sha256 over every LoRA weight in the model, in name order (equal on all ranks when data parallel works)."""
    digest = hashlib.sha256()
    for name, param in sorted(unet.named_parameters()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _registered(catalog_uri: str | None, key: str) -> list[str]:
    if not catalog_uri:
        return []
    from motiondirector import api

    return [m.id for m in api.open_catalog(catalog_uri).query(tags=[KEY_TAG + key], limit=None)]


def _with_preview(config: Any, job: dict[str, Any]) -> Any:
    """Sample the preview at the last step (the validation section; unset sampling settings take the base
    model's defaults inside train())."""
    if not job["preview"]:
        return config
    updates: dict[str, Any] = {}
    if not config.validation.every:
        updates["every"] = config.steps
    if job["preview_prompt"] and not config.validation.prompts:
        updates["prompts"] = [job["preview_prompt"]]
    return config.model_copy(update={"validation": config.validation.model_copy(update=updates)}) if updates \
        else config


class _Reporter:
    """The library's observer inside a Ray Train worker: checkpoints -> ray.train.report, steps -> the board,
    the LoRA digest of the last step -> the board (per rank).

    `ray.train.report` is a barrier over the job's workers, so every rank must call it equally often and
    at the same point between the loop's collectives. `CheckpointWritten` comes from rank 0 only, and
    writing a checkpoint is itself collective in a data-parallel run; so checkpoint n is reported by all
    ranks at the next `TrainStep` (emitted on every rank, after that step's collectives), rank 0
    attaching the folder, and the last one after train() returns (`flush`).
    """

    def __init__(self, job: dict[str, Any], rank: int, board: Any, storage: str, unet: Any, run_dir: Path) -> None:
        self.job, self.rank, self.board, self.storage, self.unet = job, rank, board, storage, unet
        self.run_dir = run_dir
        self.every = int(job["config"]["checkpoint_every"])
        self.start = 0
        self.losses: dict[str, float] = {}
        self.pending: tuple[int, Path] | None = None  # rank 0: the checkpoint written, not reported yet
        self.digest: str | None = None

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

    def flush(self, step: int) -> None:
        """All ranks: report the metrics of checkpoint `step`; rank 0 attaches the checkpoint folder."""
        from ray.train import Checkpoint, report

        checkpoint = None
        if self.pending is not None and self.pending[0] == step:
            # The run's config.yaml travels with the checkpoint: it holds what train() resolved at run time
            # (e.g. `mode` from the data), which a resumed attempt must find unchanged.
            from motiondirector.api import RunLayout

            shutil.copyfile(RunLayout(self.run_dir).config, RunLayout(self.pending[1]).config)
            checkpoint = Checkpoint.from_directory(str(self.pending[1]))
            self.pending = None
        report({"step": step, **self.losses}, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step}",
               delete_local_checkpoint_after_upload=False)

    def __call__(self, event: Any) -> None:
        from motiondirector.api import CheckpointWritten, TrainStarted, TrainStep

        job_id = self.job["job_id"]
        if isinstance(event, TrainStarted):
            self.start = event.start_step
            if self.rank == 0:
                self.board.update.remote(job_id, {"state": "running", "step": event.start_step,
                                                  "steps": event.total_steps, "resumed_from": event.start_step or None})
        elif isinstance(event, TrainStep):
            previous = event.step - 1
            if self.every and previous > self.start and previous % self.every == 0:
                self.flush(previous)
            self.losses = dict(event.losses)
            if self.rank == 0:
                self.board.update.remote(job_id, {"state": "running", "step": event.step, "steps": event.total_steps,
                                                  "losses": self.losses, "it_s": event.steps_per_second})
            if event.step == event.total_steps:  # the adapters are still installed and final
                self.digest = lora_digest(self.unet)
            self._kill_if_asked(event.step)
        elif isinstance(event, CheckpointWritten) and self.rank == 0:
            self.pending = (event.step, Path(event.path))


def _restore(checkpoint: Any, run_dir: Path, config: Any, backbone: Any) -> int:
    """The job's last reported checkpoint -> run_dir/checkpoints/step-<n> + the run's config.yaml; returns n."""
    from motiondirector.api import RunLayout

    step = int(Path(checkpoint.path).name.removeprefix("step-"))  # reported as checkpoint_dir_name=step-<n>
    layout = RunLayout(run_dir)
    restored = layout.checkpoint(step)
    checkpoint.to_directory(str(restored.root))
    if restored.config.exists():  # the config the run trained with (see _Reporter.flush)
        restored.config.replace(layout.config)
    else:  # a checkpoint reported before configs travelled with them
        layout.config.write_text(config.with_model_defaults(backbone.defaults).to_yaml())
    return step


def _train_job(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function: one rank of one job."""
    import ray.train

    from motiondirector import api

    job, board, storage = loop_config["job"], loop_config["board"], loop_config["storage"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    existing = _registered(loop_config["catalog"], job["key"])
    if existing:  # a previous attempt registered the LoRAs and died before returning
        return {"catalog_ids": existing, "skipped": True}
    config = api.validate_config(job["config"], f"job {job['name']}")
    if loop_config["use_gpu"] and config.device == "auto":
        config = config.model_copy(update={"device": "cuda"})
    config = _with_preview(config, job)
    workdir = Path(tempfile.mkdtemp(prefix=f"motiondirector-{job['job_id']}-rank{rank}-"))
    try:
        try:
            backbone = api.load_backbone(config.base, api.resolve_device(config.device))
        except (api.ModelNotAvailableError, api.ModelTooLargeError) as error:
            return {"error": f"{type(error).__name__}: {error}"}  # the same on every attempt: no retry
        run_dir = workdir / "run"
        reporter = _Reporter(job, rank, board, storage, backbone.unet, run_dir)
        catalog = loop_config["catalog"] if rank == 0 else None
        began = time.perf_counter()
        try:
            # The job's ingested records, read once here: an unset mode follows the data (images or
            # videos), and the config.yaml a resumed attempt restores must say the mode the run had.
            records = config.data.load(vae_id=backbone.vae_id)
            config = config.with_data_kind(images=all(record.is_image for record in records))
            checkpoint = ray.train.get_checkpoint()
            resumed = _restore(checkpoint, run_dir, config, backbone) if checkpoint is not None else None
            if rank == 0:  # where each attempt ran, for the report's `moved`
                board.attempt.remote(job["job_id"], {"node_id": ray.get_runtime_context().get_node_id(),
                                                     "resumed_from": resumed,
                                                     "started_at": datetime.now(UTC).isoformat()})
            summary, manifests = api.train_and_register(
                config, run_dir, catalog, name=job["name"], tags=_tags(job, loop_config["batch_id"]),
                description=_description(job), resume=resumed is not None, backbone=backbone, records=records,
                observers=[reporter], rank=rank, world_size=world_size)
        except (ValueError, FileNotFoundError) as error:  # bad data or config: deterministic, no retry
            return {"error": f"{type(error).__name__}: {error}"}
        seconds = time.perf_counter() - began
        reporter.flush(config.steps)  # the last checkpoint (every rank, as every report)
        if reporter.digest is not None:
            board.rank_digest.remote(job["job_id"], rank, reporter.digest)
        return {"summary": summary.to_json(), "resumed_from": resumed, "digest": reporter.digest,
                "steps_per_second": (config.steps - (resumed or 0)) / max(seconds, 1e-9),
                "catalog_ids": [m.id for m in manifests]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tags(job: dict[str, Any], batch_id: str) -> list[str]:
    return [KEY_TAG + job["key"], f"batch:{batch_id}", f"job:{job['name']}"]


def _description(job: dict[str, Any]) -> str:
    lineage = job["lineage"]
    code = lineage["code_version"]
    return (f"train-batch job {job['name']}: dataset {job['dataset']}, spec sha256 {lineage['spec_sha256'][:12]}, "
            f"code {code.get('package')}" + (f"@{code['git'][:10]}" if "git" in code else ""))


# --- one job = one TorchTrainer ------------------------------------------------------------------

@ray.remote(num_cpus=0, max_retries=0)
def _fit_job(job: dict[str, Any], resources: dict[str, Any], storage: str, catalog: str | None, batch_id: str,
             board: Any) -> dict[str, Any]:
    """Build and fit one job's TorchTrainer; returns its outcome (never raises for a failed job)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    began = time.perf_counter()
    use_gpu = resources["gpus_per_job"] > 0
    per_worker = {"CPU": resources["cpus_per_job"], **({"GPU": resources["gpus_per_job"]} if use_gpu else {}),
                  **resources["custom"]}
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
    attempts: list[dict[str, Any]] = field(default_factory=list)  # node id + resumed-from step per attempt

    @property
    def moved(self) -> bool:
        """Whether a restarted attempt ran on another node than the one before it (e.g. a lost node)."""
        return len({a["node_id"] for a in self.attempts}) > 1

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.job.name, "job_id": self.job.job_id, "key": self.job.key, "state": self.state,
                "dataset": self.job.dataset, "catalog_ids": self.catalog_ids, "error": self.error,
                "resumed_from": self.resumed_from, "seconds": self.seconds, "losses": self.losses,
                "steps_per_second": self.steps_per_second,
                "rank_digests": {str(k): v for k, v in sorted(self.rank_digests.items())},
                "attempts": self.attempts, "moved": self.moved,
                "steps": self.job.config["steps"], "workers": self.job.resources.workers,
                "lineage": self.job.lineage}


def new_batch_id(spec: BatchSpec) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{spec.sha256[:8]}"


def _already_registered(catalog_uri: str | None, jobs: list[Job]) -> dict[str, list[str]]:
    """key -> catalog ids of the jobs whose LoRAs are registered already (one catalog query)."""
    if not catalog_uri:
        return {}
    from motiondirector import api

    found: dict[str, list[str]] = {}
    wanted = {KEY_TAG + job.key: job.key for job in jobs}
    for manifest in api.open_catalog(catalog_uri).query(limit=None):
        for tag in manifest.tags:
            if tag in wanted:
                found.setdefault(wanted[tag], []).append(manifest.id)
    return found


def _demand(job: Job) -> dict[str, float]:
    r = job.resources
    return {"CPU": r.workers * r.cpus_per_job, "GPU": r.workers * r.gpus_per_job,
            **{name: r.workers * amount for name, amount in r.custom.items()}}


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
                row.update({k: v for k, v in values.items() if k in ("step", "steps", "losses", "it_s", "node_id")})
                row["state"] = "running" if values.get("state") == "running" else outcome.state
            else:
                row.update({k: v for k, v in values.items() if k in ("step", "steps")})
            row.setdefault("steps", outcome.job.config["steps"])
            jobs.append(row)
        return {"batch_id": batch_id, "jobs": jobs}

    if pending:
        if not ray.is_initialized():
            ray.init()
        # The board and the per-job tasks (with the Train controllers they start) stay on the driver's
        # node: losing a worker node then loses training workers only, which Ray Train restarts. Hard
        # affinity: a soft one let Ray place the board on a worker node (seen in tests/test_multinode.py),
        # and the driver's node lives as long as the driver.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # Restarted if its process dies: progress only (a restart loses the attempts recorded so far).
        board = ProgressBoard.options(max_restarts=-1, scheduling_strategy=here).remote()
        total = ray.cluster_resources()
        capacity = {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0),
                    **{name: total.get(name, 0.0) for job in pending for name in job.resources.custom}}
        for job in pending:
            if not _fits(_demand(job), capacity):
                outcomes[job.job_id].state = "failed"
                outcomes[job.job_id].error = (f"needs {_demand(job)} but the cluster has {capacity} "
                                              "(resources: workers x cpus_per_job / gpus_per_job / custom)")
        queue = [job for job in pending if outcomes[job.job_id].state == "queued"]
        cap = spec.resources.max_concurrent or math.inf
        running: dict[Any, Job] = {}
        free = dict(capacity)
        while queue or running:
            while queue and len(running) < cap and _fits(_demand(queue[0]), free):
                job = queue.pop(0)
                for k, v in _demand(job).items():
                    free[k] = free.get(k, 0.0) - v
                # A launcher whose process dies is retried: fit() resumes the run from its storage.
                ref = _fit_job.options(max_retries=job.resources.max_failures, scheduling_strategy=here).remote(
                    job.payload(), job.resources.model_dump(), storage, spec.catalog, batch_id, board)
                running[ref] = job
                outcomes[job.job_id].state = "running"
            if not running:  # nothing fits while nothing runs: cannot happen after the capacity check
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=poll_seconds)
            for ref in done:
                job = running.pop(ref)
                for k, v in _demand(job).items():
                    free[k] = free.get(k, 0.0) + v
                _finish(outcomes[job.job_id], _outcome(ref))
            if on_update is not None:
                on_update(snapshot(_live(board)))
        live = _live(board)
        for job_id, values in live.items():
            outcomes[job_id].rank_digests = {int(k): v for k, v in values.get("rank_digests", {}).items()}
            outcomes[job_id].attempts = list(values.get("attempts", []))
        ray.kill(board)
    report = {
        "batch_id": batch_id, "spec": str(spec.path), "spec_sha256": spec.sha256, "storage": storage,
        "catalog": spec.catalog, "code_version": code_version(), "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "counts": {state: sum(o.state == state for o in outcomes.values()) for state in STATES},
        "jobs": [o.as_dict() for o in outcomes.values()],
        "moved": [o.job.name for o in outcomes.values() if o.moved],
    }
    report["report"] = _join(storage, "batches", batch_id, "report.json")
    write_json_atomic(report["report"], report)
    if on_update is not None:
        on_update(snapshot())
    return report


def _outcome(ref: Any) -> dict[str, Any]:
    """A launcher's result; its process dying past its retries fails the job (a re-run resumes it)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        return {"state": "failed", "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def _live(board: Any) -> dict[str, dict[str, Any]]:
    """The progress board's snapshot, or nothing while it restarts."""
    try:
        return ray.get(board.snapshot.remote(), timeout=30)
    except ray.exceptions.RayError:
        return {}


def _finish(outcome: JobOutcome, result: dict[str, Any]) -> None:
    outcome.state = result["state"]
    outcome.error = result.get("error")
    outcome.seconds = round(result.get("seconds", 0.0), 3)
    outcome.catalog_ids = list(result.get("catalog_ids", []))
    outcome.resumed_from = result.get("resumed_from")
    outcome.steps_per_second = result.get("steps_per_second")
    outcome.losses = dict((result.get("summary") or {}).get("losses", {}))
