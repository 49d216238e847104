"""The Ray Serve application: ingress (FastAPI) -> generator (model, LoRA cache, batching), job board.

    serve build serve.app:build_app -o serve_config.yaml       # for a KubeRay RayService
    serve run serve.app:build_app base=toy catalog=/data/catalog
    motiondirector serve --base toy --catalog /data/catalog    # the same on a local Ray cluster

`build_app(args)` takes the settings of serve/settings.py as a dict (values may be strings, as
`serve run key=value` passes them) and returns the bound application.
"""

from __future__ import annotations

import json
from typing import Any

from ray import serve
from ray.serve import Application

from serve.generator import GeneratorService
from serve.ingress import IngressService
from serve.jobs import JobBoard
from serve.settings import ServeSettings, load_settings


def _board_deployment(settings: ServeSettings) -> Any:
    @serve.deployment(name="JobBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=10_000)
    class Board(JobBoard):
        pass

    return Board


def _generator_deployment(settings: ServeSettings) -> Any:
    cpus, gpus = settings.generator_cpus, settings.generator_gpus
    batch = settings.max_batch_size

    @serve.deployment(name="Generator", num_replicas=settings.generator_replicas,
                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                      # Room for a full batch plus the next one filling up; more wait in the router.
                      max_ongoing_requests=2 * batch, health_check_timeout_s=120)
    class Generator(GeneratorService):
        async def generate(self, job_id: str, job: dict[str, Any]) -> dict[str, Any]:
            return await self.encode(job_id, await self._batched((job_id, job)))

        @serve.multiplexed(max_num_models_per_replica=settings.compositions_per_replica)
        async def composition(self, model_id: str) -> Any:
            return await self.load_composition(model_id)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=settings.batch_wait_s)
        async def _batched(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
            # Serve splits batches by multiplexed model id: every item here has the same LoRA set.
            model_id = serve.get_multiplexed_model_id() or "base"
            try:
                composition = await self.composition(model_id)
            except Exception as error:  # e.g. an entry removed from the catalog since it was checked
                return [{"error": f"loading LoRA set {model_id}: {type(error).__name__}: {error}"}] * len(items)
            # Sampled videos come back here; each request encodes its own (Generator.encode).
            return await self.run_batch(composition, items)

    return Generator


def _ingress_deployment(settings: ServeSettings) -> Any:
    @serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=1000)
    @serve.ingress()
    class Ingress(IngressService):
        def __serve_build_asgi_app__(self) -> Any:
            return self.build_app()

    return Ingress


def application(settings: ServeSettings) -> Application:
    data = settings.model_dump(mode="json")
    board = _board_deployment(settings).bind(settings.queue_limit, settings.results_kept)
    generator = _generator_deployment(settings).bind(board, data)
    return _ingress_deployment(settings).bind(generator, board, data)


def settings_from_args(args: dict[str, Any] | None) -> ServeSettings:
    """ServeSettings from builder args: `config` names a settings file, the other keys override it."""
    overrides = dict(args or {})
    config = overrides.pop("config", None)
    if isinstance(overrides.get("limits"), str):  # `serve run ... limits='{"max_frames": 16}'`
        overrides["limits"] = json.loads(overrides["limits"])
    return load_settings(config, **overrides)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve build` / `serve run`: args are ServeSettings fields (`config`: a file)."""
    return application(settings_from_args(args))
