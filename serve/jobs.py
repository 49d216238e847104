"""The job board: status, progress and results of generations, in memory, bounded.

One replica of it (a Serve deployment) is the single place where a generation's state lives: the
ingress creates jobs and records their outcome, generator replicas report progress. It answers
"queue full" instead of growing without limit, and keeps only the newest `results_kept` finished
jobs (their videos are held in memory; a restart of this replica forgets every job).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ACTIVE = ("queued", "running")
FILES = ("mp4", "gif", "sidecar")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Job:
    id: str
    composition: str
    request: dict[str, Any]
    status: str = "queued"
    progress: dict[str, Any] | None = None
    reason: str | None = None
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    params: dict[str, Any] | None = None
    seed: int | None = None
    seconds: float | None = None
    files: dict[str, bytes] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "progress": self.progress, "reason": self.reason,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "composition": self.composition, "request": self.request, "params": self.params,
                "seed": self.seed, "seconds": self.seconds, "files": sorted(self.files)}


class JobBoard:
    """All generations this application knows of (queued, running and the newest finished ones)."""

    def __init__(self, queue_limit: int, results_kept: int) -> None:
        self.queue_limit = queue_limit
        self.results_kept = results_kept
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # insertion order = creation order
        self._finished: OrderedDict[str, None] = OrderedDict()  # finish order, for eviction
        self.refused = 0

    def _active(self) -> int:
        return sum(1 for job in self._jobs.values() if job.status in ACTIVE)

    async def create(self, job_id: str, composition: str, request: dict[str, Any]) -> bool:
        """Register a queued job; False (nothing created) when `queue_limit` jobs are queued or running."""
        if self._active() >= self.queue_limit:
            self.refused += 1
            return False
        self._jobs[job_id] = Job(job_id, composition, request)
        return True

    async def started(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.status == "queued":
            job.status, job.started_at = "running", _now()

    async def progress(self, job_id: str, phase: str, done: int, total: int) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.status in ACTIVE:
            job.status = "running"
            job.started_at = job.started_at or _now()
            job.progress = {"phase": phase, "done": done, "total": total}

    async def finish(self, job_id: str, result: dict[str, Any]) -> None:
        """`result`: {"params", "seed", "seconds", "files": {"mp4"|"gif"|"sidecar": bytes}} or {"error": why}."""
        job = self._jobs.get(job_id)
        if job is None or job.status not in ACTIVE:
            return
        job.finished_at = _now()
        job.started_at = job.started_at or job.finished_at
        if "error" in result:
            job.status, job.reason = "failed", str(result["error"])
        else:
            job.status = "done"
            job.params, job.seed, job.seconds = result["params"], result["seed"], result.get("seconds")
            job.files = {kind: result["files"][kind] for kind in FILES if kind in result["files"]}
            if job.progress is not None:
                job.progress = {**job.progress, "done": job.progress["total"]}
        self._finished[job_id] = None
        while len(self._finished) > self.results_kept:
            old, _ = self._finished.popitem(last=False)
            self._jobs.pop(old, None)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.public()

    async def file(self, job_id: str, kind: str) -> bytes | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.files.get(kind)

    async def stats(self) -> dict[str, int]:
        counts = {status: 0 for status in ("queued", "running", "done", "failed")}
        for job in self._jobs.values():
            counts[job.status] += 1
        return {**counts, "refused": self.refused, "queue_limit": self.queue_limit}
