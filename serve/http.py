"""The HTTP surface: routes, auth, body limit and the one error format, as a FastAPI app.

`create_api(service)` builds the app around an object that does the work (the ingress deployment,
serve/ingress.py). Errors are always JSON `{"error", "detail", "field"}`; `field` names the
offending request field (dotted, e.g. `motions.0.lora_id`) or is null.
"""

from __future__ import annotations

import hmac
from importlib.resources import files
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.schemas import (
    CATALOG_ID_PATTERN,
    JOB_ID_PATTERN,
    ErrorBody,
    GenerationRequest,
    GenerationStatus,
    LoraDetail,
    LoraPage,
    ModelInfo,
)

if TYPE_CHECKING:
    from serve.ingress import IngressService

# The web page's files, read once: requests name one of these keys, never a path.
WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
ERRORS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 422: "invalid_request", 429: "queue_full",
          500: "internal", 503: "unavailable", 504: "timeout"}
DOC_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 413, 422, 429)}


LoraId = Annotated[str, Path(pattern=CATALOG_ID_PATTERN, description="Catalog id")]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="Generation id")]
FileName = Annotated[str, Path(pattern=r"^(video\.mp4|video\.gif|sidecar\.json)$")]


class ApiError(Exception):
    """An answer other than success: HTTP status, error code, human detail and the field at fault."""

    def __init__(self, status: int, detail: str, field: str | None = None, error: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field
        self.error = error or ERRORS.get(status, "error")
        self.headers = headers


def error_response(status: int, detail: str, field: str | None = None, error: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=error or ERRORS.get(status, "error"), detail=detail, field=field)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_of(location: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get 413, by Content-Length or while streaming in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.limit
                except ValueError:
                    too_large = False
                if too_large:
                    await self._refuse(scope, receive, send)
                    return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # FastAPI re-raises HTTP exceptions from body reading; the handler answers 413.
                raise StarletteHTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(413, f"request body over {self.limit} bytes")
        await response(scope, receive, send)


def create_api(service: IngressService) -> FastAPI:
    settings = service.settings
    app = FastAPI(title="motiondirector", version="1",
                  description="Compose catalog LoRAs (motions + an optional appearance) into videos, and browse "
                              "the catalog. Errors are JSON {error, detail, field}. docs/serve.md has the details.")
    app.add_middleware(BodyLimit, limit=settings.limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.detail, error.field, error.error, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        detail = "; ".join(f"{_field_of(p['loc']) or 'body'}: {p['msg']}" for p in problems[:5])
        return error_response(422, detail, _field_of(first["loc"]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"{type(error).__name__}: {error}")

    def authorized(request: Request) -> None:
        token = service.token
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authorization",
                           headers={"WWW-Authenticate": "Bearer"})

    web = files("serve") / "web"
    page = (web / "index.html").read_text()
    assets = {name: ((web / name).read_bytes(), media) for name, media in WEB_FILES.items()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise ApiError(404, f"no web file {name!r}", "name")
        content, media = assets[name]
        return Response(content, media_type=media)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The ingress is up (says nothing about the model)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}})
    async def readyz() -> dict[str, Any]:
        """The base model is loaded in a generator replica and the catalog is reachable."""
        return {"status": "ready", **await service.readiness()}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)], responses=DOC_RESPONSES)

    @v1.get("/info", response_model=ModelInfo, tags=["generation"])
    async def info() -> dict[str, Any]:
        """The served base model, its defaults and the request limits."""
        return await service.model_info()

    @v1.get("/loras", response_model=LoraPage, tags=["catalog"])
    async def loras(
        request: Request,
        concept: str | None = None,
        kind: Annotated[str | None, Query(pattern="^(temporal|spatial)$")] = None,
        base: str | None = None,
        tag: Annotated[list[str] | None, Query(description="Entries having all of these tags.")] = None,
        text: Annotated[str | None, Query(max_length=200)] = None,
        sort: Annotated[str, Query(max_length=64, description="id, name, kind, concept, rank, step, created_at "
                                                              "or metrics.NAME; '-' prefix: descending")] = "-id",
        limit: Annotated[int, Query(ge=1, le=200)] = 24,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Catalog entries matching every filter, sorted and paginated."""
        return await service.list_loras(_root(request), concept=concept, kind=kind, base=base, tags=tag or [],
                                        text=text, sort=sort, limit=limit, offset=offset)

    @v1.get("/loras/{lora_id}", response_model=LoraDetail, tags=["catalog"])
    async def lora(request: Request, lora_id: LoraId) -> dict[str, Any]:
        """One entry: its summary and whole manifest (metrics, lineage, training config)."""
        return await service.lora(_root(request), lora_id)

    @v1.get("/loras/{lora_id}/preview.gif", tags=["catalog"], response_class=Response)
    async def preview(lora_id: LoraId) -> Response:
        content, media = await service.preview(lora_id)
        return Response(content, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @v1.post("/generations", status_code=202, response_model=GenerationStatus, tags=["generation"],
             responses={200: {"model": GenerationStatus, "description": "with ?wait=true: the finished job"}})
    async def create_generation(request: Request, body: GenerationRequest,
                                wait: Annotated[bool, Query(description="Answer when the video is done.")] = False,
                                ) -> JSONResponse:
        """Queue a generation (202 + its id); with `?wait=true` answer when it is done or failed (200)."""
        status, document = await service.submit(_root(request), body, wait=wait)
        location = document["links"]["self"]
        return JSONResponse(document, status_code=status, headers={"Location": location})

    @v1.get("/generations/{job_id}", response_model=GenerationStatus, tags=["generation"])
    async def generation(request: Request, job_id: JobId) -> dict[str, Any]:
        """Status (queued / running with progress / done / failed with reason), parameters used, seed, links."""
        return await service.job(_root(request), job_id)

    media_types = {"video.mp4": ("mp4", "video/mp4"), "video.gif": ("gif", "image/gif"),
                   "sidecar.json": ("sidecar", "application/json")}

    @v1.get("/generations/{job_id}/{name}", tags=["generation"], response_class=Response)
    async def generation_file(job_id: JobId, name: FileName) -> Response:
        """The finished video (mp4 or gif) or its replay sidecar."""
        kind, media = media_types[name]
        return Response(await service.job_file(job_id, kind), media_type=media)

    app.include_router(v1)
    return app


def _root(request: Request) -> str:
    """The URL prefix the app is mounted under (Serve's route prefix), without a trailing slash."""
    return str(request.scope.get("root_path", "")).rstrip("/")
