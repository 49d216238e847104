"""Run the app on a Ray cluster until the caller is done: what `motiondirector serve` does.

Joins the cluster `$RAY_ADDRESS` names, else starts a local one. On its own local cluster the exit
shuts Serve and Ray down; on a joined cluster it deletes only this application.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray
from ray import serve

from serve.app import application
from serve.settings import ServeSettings


class AppDidNotStart(RuntimeError):
    """A replica failed to start; `model_unavailable` when the base model could not be loaded."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.model_unavailable = "ModelNotAvailableError" in str(error) or "ModelTooLargeError" in str(error)


@contextlib.contextmanager
def running(settings: ServeSettings) -> Iterator[str]:
    """Deploy the app; yields its URL; takes it (and a cluster this started) down on exit."""
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    own_cluster = started and not os.environ.get("RAY_ADDRESS")
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application(settings), name=settings.app_name, route_prefix=settings.route_prefix)
        except Exception as error:  # a replica failed to start (e.g. the model could not be loaded)
            raise AppDidNotStart(error) from error
        yield f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    finally:
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
        else:
            with contextlib.suppress(Exception):
                serve.delete(settings.app_name)
            if started:
                ray.shutdown()  # disconnects this driver; the cluster stays
