"""The ingress: validates requests, browses the catalog, queues generations and tracks them.

It holds no model. Generations go to the generator deployment with the LoRA set as the multiplexed
model id (so they land on a replica that already holds that set), and their state lives on the job
board. Nothing here samples or reads LoRA weights; the catalog is read through `motiondirector.api`.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import OrderedDict
from typing import Any

from starlette.concurrency import run_in_threadpool

from serve.http import ApiError, create_api
from serve.schemas import MAX_SEED, GenerationRequest, LoraRef
from serve.settings import ServeSettings, read_api_token

_KIND_OF_ROLE = {"motion": "temporal", "appearance": "spatial"}
_PREVIEW_MEDIA = {".gif": "image/gif", ".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp"}
_RESOLVED_KEPT = 256


def composition_id(motions: list[tuple[str, float]], appearance: tuple[str, float] | None) -> str:
    """The multiplexed model id of a LoRA set: "motion:<id>@<scale>+...+appearance:<id>@<scale>".

    Motions keep their request order: adapters are summed in that order, and another order could
    change the last bits of the result. No LoRA at all is "base".
    """
    parts = [f"motion:{lora_id}@{scale!r}" for lora_id, scale in motions]
    if appearance is not None:
        parts.append(f"appearance:{appearance[0]}@{appearance[1]!r}")
    return "+".join(parts) or "base"


def parse_composition(model_id: str) -> list[tuple[str, str, float]]:
    """Inverse of composition_id: [(role, lora_id, scale)]."""
    if model_id == "base":
        return []
    choices = []
    for part in model_id.split("+"):
        role, _, rest = part.partition(":")
        lora_id, _, scale = rest.partition("@")
        if role not in _KIND_OF_ROLE or not lora_id or not scale:
            raise ValueError(f"{model_id!r} is not a composition id")
        choices.append((role, lora_id, float(scale)))
    return choices


class IngressService:
    """What the routes of serve/http.py call. `generator` and `board` are Serve deployment handles."""

    def __init__(self, generator: Any, board: Any, settings: dict[str, Any]) -> None:
        from motiondirector import api

        self.api = api
        self.settings = ServeSettings.model_validate(settings)
        self.token = read_api_token(self.settings)
        self.generator, self.board = generator, board
        self.catalog = api.open_catalog(self.settings.catalog)
        self._info: dict[str, Any] | None = None
        self._resolved: OrderedDict[str, Any] = OrderedDict()  # id -> local folder (entries are immutable)
        self._tasks: set[asyncio.Task] = set()

    def build_app(self) -> Any:
        return create_api(self)

    # ---- model and health ------------------------------------------------------------------------

    async def model_info(self) -> dict[str, Any]:
        if self._info is None:
            info = await self.generator.info.remote()
            self._info = {**info, "limits": self.settings.limits.model_dump(), "auth": self.token is not None}
        return self._info

    async def readiness(self) -> dict[str, Any]:
        try:  # asked afresh each time: a generator that stopped answering makes the app not ready
            info = await asyncio.wait_for(self.generator.info.remote(), timeout=5.0)
            await run_in_threadpool(self.catalog.current_index_file)
        except Exception as error:  # not ready, whatever the cause: say why
            raise ApiError(503, f"not ready: {type(error).__name__}: {error}") from None
        return {"model": info["model_id"], "catalog": self.catalog.uri, "jobs": await self.board.stats.remote()}

    # ---- catalog -----------------------------------------------------------------------------------

    def _summary(self, root: str, manifest: Any) -> dict[str, Any]:
        url = f"{root}/v1/loras/{manifest.id}"
        return {"id": manifest.id, "name": manifest.name, "kind": manifest.kind, "concept": manifest.concept,
                "base_model_id": manifest.base.model_id, "rank": manifest.rank, "step": manifest.step,
                "tags": list(manifest.tags), "metrics": dict(manifest.metrics),
                "created_at": manifest.created_at.isoformat(), "lineage": list(manifest.lineage),
                "preview": f"{url}/preview.gif" if manifest.preview else None, "url": url}

    async def list_loras(self, root: str, *, sort: str, limit: int, offset: int, **filters: Any) -> dict[str, Any]:
        try:
            page = await run_in_threadpool(lambda: self.catalog.page(sort=sort, limit=limit, offset=offset,
                                                                     **filters))
        except ValueError as error:  # e.g. an unknown sort key
            raise ApiError(422, str(error), "sort") from None
        return {"items": [self._summary(root, m) for m in page.manifests], "total": page.total,
                "limit": limit, "offset": offset}

    async def _manifest(self, lora_id: str, field: str) -> Any:
        try:
            self.api.validate_id(lora_id)
            return await run_in_threadpool(self.catalog.get, lora_id)
        except self.api.InvalidIdError as error:
            raise ApiError(422, str(error), field) from None
        except self.api.UnknownEntryError:
            raise ApiError(404, f"no LoRA {lora_id} in the catalog", field) from None
        except self.api.PackageError as error:  # committed but invalid manifest
            raise ApiError(422, f"catalog entry {lora_id} is invalid: {error}", field) from None

    async def lora(self, root: str, lora_id: str) -> dict[str, Any]:
        manifest = await self._manifest(lora_id, "lora_id")
        return {**self._summary(root, manifest), "manifest": manifest.model_dump(mode="json")}

    async def preview(self, lora_id: str) -> tuple[bytes, str]:
        manifest = await self._manifest(lora_id, "lora_id")
        if not manifest.preview:
            raise ApiError(404, f"LoRA {lora_id} has no preview", "lora_id")
        folder = self._resolved.get(lora_id)
        if folder is None:
            try:
                folder = await run_in_threadpool(self.catalog.resolve, lora_id)
            except self.api.PackageError as error:  # CorruptEntryError: files differ from their hashes
                raise ApiError(404, f"LoRA {lora_id}: {error}", "lora_id") from None
            self._resolved[lora_id] = folder
            while len(self._resolved) > _RESOLVED_KEPT:
                self._resolved.popitem(last=False)
        # `preview` is a plain relative name inside the entry (checked when the manifest was parsed).
        content = await run_in_threadpool((folder / manifest.preview).read_bytes)
        media = _PREVIEW_MEDIA.get(folder.joinpath(manifest.preview).suffix.lower(), "application/octet-stream")
        return content, media

    # ---- generations -------------------------------------------------------------------------------

    async def _check_lora(self, ref: LoraRef, role: str, field: str, info: dict[str, Any]) -> None:
        manifest = await self._manifest(ref.lora_id, field)
        expected = _KIND_OF_ROLE[role]
        if manifest.kind != expected:
            other = "appearance" if role == "motion" else "motion"
            raise ApiError(422, f"LoRA {ref.lora_id} is a {manifest.kind} ({other}) LoRA; {role}s must be "
                                f"{expected}", field)
        if manifest.base.architecture != info["architecture"]:
            raise ApiError(422, f"LoRA {ref.lora_id} was trained on {manifest.base.model_id} "
                                f"({manifest.base.architecture}); this server runs {info['model_id']} "
                                f"({info['architecture']})", field)

    def _sampling(self, body: GenerationRequest, info: dict[str, Any]) -> dict[str, Any]:
        """The request's sampling values with the model's defaults filled in, checked against the limits."""
        limits, defaults = self.settings.limits, info["defaults"]
        values = {name: getattr(body, name) if getattr(body, name) is not None else defaults[name]
                  for name in ("frames", "height", "width", "steps", "guidance")}
        checks = [("frames", limits.max_frames), ("height", limits.max_side), ("width", limits.max_side),
                  ("steps", limits.max_steps), ("guidance", limits.max_guidance)]
        for name, highest in checks:
            if values[name] > highest:
                raise ApiError(422, f"{name} {values[name]} is over this server's limit of {highest}", name)
        multiple = info["size_multiple"]
        for name in ("height", "width"):
            if values[name] % multiple:
                raise ApiError(422, f"{name} {values[name]} must be a multiple of {multiple}", name)
        if len(body.prompt) > limits.max_prompt_chars:
            raise ApiError(422, f"prompt over {limits.max_prompt_chars} characters", "prompt")
        if len(body.motions) > limits.max_motions:
            raise ApiError(422, f"{len(body.motions)} motions; at most {limits.max_motions}", "motions")
        return values

    async def submit(self, root: str, body: GenerationRequest, *, wait: bool) -> tuple[int, dict[str, Any]]:
        info = await self.model_info()
        sampling = self._sampling(body, info)
        for i, ref in enumerate(body.motions):
            await self._check_lora(ref, "motion", f"motions.{i}.lora_id", info)
        if body.appearance is not None:
            await self._check_lora(body.appearance, "appearance", "appearance.lora_id", info)
        motions = [(ref.lora_id, ref.scale) for ref in body.motions]
        appearance = (body.appearance.lora_id, body.appearance.scale) if body.appearance else None
        composition = composition_id(motions, appearance)
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        job = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": seed,
               "fps": info["defaults"]["fps"], **sampling}
        job_id = uuid.uuid4().hex
        if not await self.board.create.remote(job_id, composition, body.model_dump(mode="json")):
            raise ApiError(429, f"{self.settings.queue_limit} generations are queued or running; retry later",
                           headers={"Retry-After": "1"})
        task = asyncio.create_task(self._run(job_id, composition, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if not wait:
            return 202, await self.job(root, job_id)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.settings.wait_timeout_s)
        except TimeoutError:
            return 202, await self.job(root, job_id)
        return 200, await self.job(root, job_id)

    async def _run(self, job_id: str, composition: str, job: dict[str, Any]) -> None:
        """Send one job to a generator replica holding its LoRA set; record the outcome on the board."""
        try:
            handle = self.generator.options(multiplexed_model_id=composition)
            result = await handle.generate.remote(job_id, job)
        except Exception as error:  # a replica that died, a cancelled call: the job fails, we keep serving
            result = {"error": f"{type(error).__name__}: {error}"}
        await self.board.finish.remote(job_id, result)

    async def job(self, root: str, job_id: str) -> dict[str, Any]:
        document = await self.board.get.remote(job_id)
        if document is None:
            raise ApiError(404, f"no generation {job_id} (unknown, or dropped from the last "
                                f"{self.settings.results_kept} kept)", "job_id")
        url = f"{root}/v1/generations/{job_id}"
        links = {"self": url}
        if document["status"] == "done":
            links.update(video_mp4=f"{url}/video.mp4", video_gif=f"{url}/video.gif", sidecar=f"{url}/sidecar.json")
        document.pop("files", None)
        return {**document, "links": links}

    async def job_file(self, job_id: str, kind: str) -> bytes:
        content = await self.board.file.remote(job_id, kind)
        if content is None:
            document = await self.board.get.remote(job_id)
            if document is None:
                raise ApiError(404, f"no generation {job_id}", "job_id")
            raise ApiError(404 if document["status"] == "failed" else 409,
                           f"generation {job_id} is {document['status']}: no {kind} (yet)", "job_id")
        return content
