"""Settings of the Serve application: one pydantic model, from a YAML/JSON file, CLI flags or `serve build` args.

Everything the deployments need travels as this model's JSON form, so `serve build serve.app:build_app`
and `motiondirector serve` configure the same thing. The API token itself never travels: the
ingress replica reads it at start-up from the file or environment variable named here (docs/serve.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from motiondirector.api import describe_validation_error

TOKEN_VARIABLE = "MOTIONDIRECTOR_API_TOKEN"
TOKEN_FILE_VARIABLE = "MOTIONDIRECTOR_API_TOKEN_FILE"


class Limits(BaseModel):
    """What one generation request may ask for (values above: 422 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    max_frames: int = Field(64, ge=1)
    max_side: int = Field(1024, ge=8, description="Largest height or width in pixels.")
    max_steps: int = Field(100, ge=1)
    max_guidance: float = Field(30.0, ge=0)
    max_motions: int = Field(4, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Larger request bodies: 413.")


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field("toy", description="Base model: 'toy', a diffusers folder or a hub id.")
    catalog: str | None = Field(None, description="Catalog URI; default $MOTIONDIRECTOR_CATALOG or the default root.")
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads per generator replica (default: torch's).")
    # Generator deployment
    generator_replicas: int = Field(1, ge=1)
    generator_cpus: float = Field(1.0, ge=0)
    generator_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1, description="Requests sharing a LoRA set and settings sampled together.")
    batch_wait_s: float = Field(0.2, ge=0, description="How long a batch waits to fill up after its first "
                                                       "request (added to a lone request's latency).")
    compositions_per_replica: int = Field(8, ge=1, description="LoRA sets a replica keeps (serve.multiplexed LRU).")
    packages_per_replica: int = Field(32, ge=1, description="LoRA packages a replica keeps resolved (LRU by id).")
    # Jobs
    queue_limit: int = Field(64, ge=1, description="Queued + running generations; more: 429.")
    results_kept: int = Field(256, ge=1, description="Finished generations kept in memory (oldest dropped).")
    wait_timeout_s: float = Field(600.0, gt=0, description="Longest `?wait=true` answer before 504.")
    limits: Limits = Field(default_factory=Limits)
    # Auth: the token is read by the ingress replica, from this file or the environment.
    api_token_file: str | None = Field(None, description=f"Bearer token file; default ${TOKEN_FILE_VARIABLE}, "
                                                         f"else ${TOKEN_VARIABLE}; neither: no auth.")
    # HTTP (used by `motiondirector serve`; `serve build` configs set these in their http_options)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "motiondirector"


def load_settings(path: str | Path | None = None, **overrides: Any) -> ServeSettings:
    """Settings from a YAML/JSON file (optional) with non-None `overrides` on top; errors name the file."""
    data: dict[str, Any] = {}
    source = "serve settings"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data = loaded or {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as error:
        problems = describe_validation_error(error, ServeSettings, limit=5)
        raise ValueError(f"{source}: invalid settings ({problems})") from None


def read_api_token(settings: ServeSettings) -> str | None:
    """The bearer token, or None (auth off). A named token file that is missing or empty is an error."""
    token_file = settings.api_token_file or os.environ.get(TOKEN_FILE_VARIABLE)
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as error:
            raise ValueError(f"API token file {token_file}: {error.strerror or error}") from None
        if not token:
            raise ValueError(f"API token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    return token or None
