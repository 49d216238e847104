"""The generator deployment: the base model stays loaded; LoRA sets are resolved, cached and batched.

- A LoRA set (a "composition") is the multiplexed model id, so Serve routes a request to a replica
  that already holds its set; the replica keeps `compositions_per_replica` sets (LRU).
- The packages of those sets are resolved through the catalog into a per-replica LRU of individual
  packages by id (`packages_per_replica`), so a LoRA shared by many sets is resolved (downloaded and
  hash-checked, for a remote catalog) once.
- Requests for the same set arrive in one `serve.batch`; those that also share their sampling
  settings go through the library's sampler together (`api.generate_batch`, one noise tensor per
  video, each from its own seed). Encoding (mp4, gif, sidecar: `api.save_video`) happens per
  request after its batch returned, on two encoder threads, while the next batch samples.
- The set of the last batch stays applied to the UNet (`api.HeldComposition`): the next batch of the
  same set skips adapter injection; another set first restores the model. The model is modified in
  place, so one thread does all sampling and a lock guards it: two sets are never active at once.

Sampling, LoRA loading and the sidecar are the library's (`motiondirector.api`); here is routing,
caching and bookkeeping only.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.ingress import parse_composition
from serve.settings import ServeSettings

_SAMPLING_KEYS = ("frames", "height", "width", "steps", "guidance", "fps", "negative_prompt")


class PackageCache:
    """Catalog ids -> resolved local package folders, an LRU by id (what the library's `catalog=` needs)."""

    def __init__(self, catalog: Any, size: int) -> None:
        self.catalog, self.size = catalog, size
        self._folders: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def resolve(self, lora_id: str) -> Path:
        with self._lock:
            folder = self._folders.get(lora_id)
            if folder is not None:
                self._folders.move_to_end(lora_id)
                self.hits += 1
                return folder
        folder = Path(self.catalog.resolve(lora_id))  # outside the lock: may download and hash
        with self._lock:
            self.misses += 1
            self._folders[lora_id] = folder
            while len(self._folders) > self.size:
                self._folders.popitem(last=False)
        return folder

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._folders)


@dataclass
class Composition:
    """A LoRA set as held by a replica: its id and (role, catalog id, scale) in adapter order."""

    id: str
    choices: list[tuple[str, str, float]]


class GeneratorService:
    def __init__(self, board: Any, settings: dict[str, Any]) -> None:
        import torch

        from motiondirector import api

        self.api = api
        self.settings = ServeSettings.model_validate(settings)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.board = board
        self.backbone = api.load_backbone(self.settings.base, self.settings.device)
        self.packages = PackageCache(api.open_catalog(self.settings.catalog), self.settings.packages_per_replica)
        # One sampling thread: the UNet is modified in place while a composition is applied.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encoder")
        self._unet_lock = threading.Lock()
        self._pending: set[asyncio.Future] = set()
        self._held: Any = None  # the LoRA set now applied to the UNet (api.HeldComposition)
        self.loads = 0  # compositions loaded by this replica (multiplex misses)
        self.applications = 0  # times a LoRA set was applied to the UNet (a switch or the first set)
        self.batches: list[int] = []  # sizes of the sampler calls made, newest last (bounded)
        self.sampler_calls = self.videos_sampled = 0

    def info(self) -> dict[str, Any]:
        backbone = self.backbone
        defaults = backbone.defaults
        return {"base": self.settings.base, "model_id": backbone.model_id,
                "architecture": backbone.architecture_fingerprint, "defaults": defaults.values(),
                "defaults_source": defaults.source,
                "size_multiple": 2 ** (len(backbone.vae.config.block_out_channels) - 1)}

    def stats(self) -> dict[str, Any]:
        return {"compositions_loaded": self.loads, "applications": self.applications, "package_hits": self.packages.hits,
                "package_misses": self.packages.misses, "packages": self.packages.ids(),
                "batch_sizes": list(self.batches), "sampler_calls": self.sampler_calls,
                "videos_sampled": self.videos_sampled}

    async def load_composition(self, model_id: str) -> Composition:
        """Resolve every package of the set into the package cache (off the event loop)."""
        choices = parse_composition(model_id)
        loop = asyncio.get_running_loop()
        for _, lora_id, _ in choices:
            await loop.run_in_executor(None, self.packages.resolve, lora_id)
        self.loads += 1
        return Composition(model_id, choices)

    async def run_batch(self, composition: Composition, items: list[tuple[str, dict[str, Any]]]) -> list[dict]:
        """Sample the batch's jobs (all of one composition): per item {"video", "started"} or {"error"}."""
        groups: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
        for item in items:
            groups.setdefault(tuple(item[1][key] for key in _SAMPLING_KEYS), []).append(item)
        loop = asyncio.get_running_loop()
        results: dict[str, dict[str, Any]] = {}
        for group in groups.values():
            report = self._reporter(loop, [job_id for job_id, _ in group])
            outcome = await loop.run_in_executor(self._executor, self._sample_group, composition, group, report)
            results.update(outcome)
        return [results[job_id] for job_id, _ in items]

    def _reporter(self, loop: asyncio.AbstractEventLoop, job_ids: list[str]) -> Callable[[Any], None]:
        """An observer (called in the sampling thread) that posts Progress events to the job board."""
        last: dict[str, tuple] = {}

        def push(phase: str, done: int, total: int) -> None:
            for job_id in job_ids:
                future = asyncio.ensure_future(self.board.progress.remote(job_id, phase, done, total))
                self._pending.add(future)
                future.add_done_callback(self._pending.discard)

        def observe(event: Any) -> None:
            if isinstance(event, self.api.Progress) and last.get(event.phase) != (event.done, event.total):
                last[event.phase] = (event.done, event.total)
                loop.call_soon_threadsafe(push, event.phase, event.done, event.total)

        return observe

    def _params(self, composition: Composition, job: dict[str, Any]) -> Any:
        api = self.api
        by_role: dict[str, list[Any]] = {"motion": [], "appearance": []}
        for role, lora_id, scale in composition.choices:
            by_role[role].append(api.LoraChoice(reference=lora_id, scale=scale))
        return api.GenerationParams(
            base=self.settings.base, prompts=[job["prompt"]], negative_prompt=job["negative_prompt"],
            motions=by_role["motion"], appearances=by_role["appearance"], steps=job["steps"],
            guidance=job["guidance"], frames=job["frames"], height=job["height"], width=job["width"],
            fps=job["fps"], seed=job["seed"])

    def _hold(self, choices: list[tuple[str, Any]]) -> Any:
        """The UNet with this LoRA set applied: kept from the previous batch if it is the same set, else
        the previous set is taken off (the model restored) and this one applied. Under `_unet_lock`."""
        if self._held is not None and self._held.matches(choices):
            return self._held
        if self._held is not None:
            held, self._held = self._held, None
            held.close()
        self._held = self.api.HeldComposition(self.backbone, choices, catalog=self.packages)
        self.applications += 1
        return self._held

    def _sample_group(self, composition: Composition, group: list[tuple[str, dict[str, Any]]],
                      report: Callable[[Any], None]) -> dict[str, dict[str, Any]]:
        """In the sampling thread: one library call for the whole group -> {job_id: {"video", "started"}}."""
        started = time.perf_counter()
        try:
            params = [self._params(composition, job) for _, job in group]
            with self._unet_lock:
                videos = self.api.generate_batch(params, backbone=self.backbone, catalog=self.packages,
                                                 observers=[report], composition=self._hold(params[0].choices()))
            self.batches = [*self.batches[-99:], len(group)]
            self.sampler_calls += 1
            self.videos_sampled += len(group)
            return {job_id: {"video": video, "started": started}
                    for (job_id, _), video in zip(group, videos, strict=True)}
        except Exception as error:  # the jobs fail with the reason; the replica keeps serving
            reason = f"{type(error).__name__}: {error}"
            return {job_id: {"error": reason} for job_id, _ in group}

    async def encode(self, job_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
        """A sampled video -> the job's result (mp4, gif and sidecar bytes, parameters used).

        Runs on the encoder threads after the batch returned, so the next batch samples meanwhile.
        """
        if "error" in outcome:
            return outcome
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._encoder, self._encode, job_id, outcome["video"],
                                              outcome["started"])
        except Exception as error:
            return {"error": f"encoding the video: {type(error).__name__}: {error}"}

    def _encode(self, job_id: str, video: Any, started: float) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="md-serve-") as folder:
            paths = self.api.save_video(video, Path(folder) / job_id)  # the library's writers and sidecar
            files = {"mp4": paths["mp4"].read_bytes(), "gif": paths["gif"].read_bytes(),
                     "sidecar": paths["json"].read_bytes()}
        return {"params": video.sidecar["params"], "seed": video.seed,
                "seconds": round(time.perf_counter() - started, 3), "files": files}
