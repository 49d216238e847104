"""Request and response models of the HTTP API (pydantic; they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Catalog ids: 26 characters of Crockford base32 (motiondirector.catalog.ids); checked again by validate_id.
CATALOG_ID_PATTERN = r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$"
# Generation ids are made here: 32 lower-case hex characters (uuid4).
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_SEED = 2**31 - 1024  # video i of a request uses seed + i; stays a 32-bit value


class LoraRef(BaseModel):
    """A catalog LoRA and its scale γ (the adapter adds γ·ΔW)."""

    model_config = ConfigDict(extra="forbid")
    lora_id: str = Field(pattern=CATALOG_ID_PATTERN, description="Catalog id (ULID, 26 characters).",
                         examples=["01JC9W5D3Q8X7K2M4N6P8R0T2V"])
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class GenerationRequest(BaseModel):
    """One video. Unset sampling values take the served base model's defaults (GET /readyz shows them)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    motions: list[LoraRef] = Field(default_factory=list, description="Temporal (motion) LoRAs, all applied.")
    appearance: LoraRef | None = Field(None, description="An optional spatial (appearance) LoRA.")
    frames: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: drawn at random, reported back.")
    noise_prior: float = Field(0.0, ge=0.0, le=0.0, description="Must be 0: the noise prior needs a reference "
                                                                 "video, which the API does not take.")


class ProgressInfo(BaseModel):
    phase: str
    done: int
    total: int


class Links(BaseModel):
    self: str
    video_mp4: str | None = None
    video_gif: str | None = None
    sidecar: str | None = None


class GenerationStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed"]
    progress: ProgressInfo | None = None
    reason: str | None = Field(None, description="Why a failed generation failed.")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    composition: str = Field(description="The LoRA set, as routed to a replica.")
    request: dict[str, Any] = Field(description="The request as submitted.")
    params: dict[str, Any] | None = Field(None, description="The parameters actually used (from the sidecar).")
    seed: int | None = None
    seconds: float | None = None
    links: Links


class LoraSummary(BaseModel):
    id: str
    name: str | None
    kind: str
    concept: str | None
    base_model_id: str
    rank: int
    step: int
    tags: list[str]
    metrics: dict[str, float]
    created_at: str
    lineage: list[str]
    preview: str | None = Field(description="URL of the preview GIF, when the entry has one.")
    url: str


class LoraPage(BaseModel):
    items: list[LoraSummary]
    total: int
    limit: int
    offset: int


class LoraDetail(LoraSummary):
    manifest: dict[str, Any]


class ErrorBody(BaseModel):
    error: str
    detail: str
    field: str | None = None


class ModelInfo(BaseModel):
    base: str
    model_id: str
    architecture: str
    defaults: dict[str, Any]
    defaults_source: str
    size_multiple: int
    limits: dict[str, Any]
    auth: bool
