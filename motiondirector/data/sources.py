"""What a dataset is (DatasetSpec) and which files and captions it contains (list_items).

Sources are local paths or fsspec URLs: a file, a folder (its files, not recursive) or a glob.
Captions come from a sidecar `<file>.txt`, else the folder's `metadata.jsonl`
(`{"file_name": ..., "text": ...}` per line), else the dataset's `caption`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from motiondirector.data.clips import ClipPolicy
from motiondirector.data.errors import DataError
from motiondirector.storage import is_url

if TYPE_CHECKING:  # a runtime import would load torch through motiondirector.backbones
    from motiondirector.backbones.defaults import ModelDefaults

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
_GLOB_CHARS = "*?["

Kind = Literal["video", "image"]


class DatasetSpec(BaseModel):
    """One training dataset: files, captions, clip policy and geometry. The encoder (base model) is not part of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", description="Dataset name in the cache and manifests; default: the first source's stem.")
    concept: str | None = Field(None, description="The motion or appearance concept, e.g. 'lifting weights'.")
    sources: list[str] = Field(min_length=1, description="Files, folders or globs (local paths or fsspec URLs).")
    kind: Kind | None = Field(None, description="video | image; default: from the file extensions.")
    caption: str | None = Field(None, description="Prompt for every file (caption_source fixed), or the fallback.")
    caption_source: Literal["auto", "sidecar", "metadata", "fixed"] = Field(
        "auto", description="auto: sidecar .txt, else metadata.jsonl, else `caption`. "
                            "sidecar / metadata: required for every file. fixed: `caption` for all.")
    # Geometry left unset takes the base model's native frames, fps and size (with_model_defaults).
    frames: int | None = Field(None, ge=1, description="Frames per clip; default: the base model's.")
    fps: float | None = Field(None, gt=0, description="Sampling rate of the clips; default: the base model's.")
    mode: Literal["start", "sliding"] = "start"
    stride: int | None = Field(None, ge=1)
    size: tuple[int, int] | None = Field(None, description="(height, width) of the encoded frames; default: the "
                                                           "base model's.")
    buckets: list[tuple[int, int]] | None = Field(
        None, description="(height, width) sizes; each file uses the one closest to its aspect ratio.")
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="Images: probability of a mirrored copy "
                                                         "(> 0 adds a mirrored clip of each image).")

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("name") and data.get("sources"):
            sources = data["sources"]
            first = sources if isinstance(sources, str) else sources[0]
            data = {**data, "name": _name_from_source(str(first))}
        return data

    @field_validator("size", mode="before")
    @classmethod
    def _square_size(cls, value: object) -> object:
        return (value, value) if isinstance(value, int) else value

    @field_validator("size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"size must be positive (height, width), got {value}")
        return value

    @field_validator("buckets")
    @classmethod
    def _positive_buckets(cls, value: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if value is not None and (not value or any(min(b) < 1 for b in value)):
            raise ValueError(f"buckets must be a non-empty list of positive (height, width), got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if self.caption_source == "fixed" and not self.caption:
            raise ValueError("caption_source 'fixed' needs `caption`")
        return self

    def with_model_defaults(self, defaults: ModelDefaults) -> DatasetSpec:
        """Unset frames / fps / size taken from the base model that encodes the dataset."""
        native = {"frames": defaults.frames, "fps": defaults.fps, "size": (defaults.height, defaults.width)}
        return self.model_copy(update={k: v for k, v in native.items() if getattr(self, k) is None})

    @property
    def clip_policy(self) -> ClipPolicy:
        if self.frames is None or self.fps is None or self.size is None:
            raise ValueError(f"dataset {self.name!r}: frames, fps and size are unset; apply the base model's "
                             "defaults first (DatasetSpec.with_model_defaults)")
        return ClipPolicy(frames=self.frames, fps=self.fps, mode=self.mode, stride=self.stride)

    @property
    def crop(self) -> str:
        return "bucket" if self.buckets else "center"


@dataclass(frozen=True)
class SourceItem:
    """One source file. video_index = its position in the dataset's sorted file list (routes per-video LoRAs)."""

    path: str
    video_index: int
    caption: str
    kind: Kind


def _name_from_source(source: str) -> str:
    """'data/bicycle/' -> 'bicycle', 'imgs/*.jpg' -> 'imgs', 's3://b/car-turn.mp4' -> 'car-turn'."""
    parts = [p for p in PurePosixPath(source.split("://")[-1]).parts if not any(c in p for c in _GLOB_CHARS)]
    return PurePosixPath(parts[-1]).stem if parts else "dataset"


def kind_of(path: str) -> Kind | None:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return None


def _expand(source: str) -> list[str]:
    """The data files one source names, as URLs/paths in the source's own form."""
    fs, stripped = fsspec.core.url_to_fs(source)
    if any(char in stripped for char in _GLOB_CHARS):
        found = [p for p in fs.glob(stripped) if fs.isfile(p)]
        explicit = False
    elif fs.isdir(stripped):
        found = [p for p in fs.ls(stripped, detail=False) if fs.isfile(p)]
        explicit = False
    elif fs.isfile(stripped):
        found, explicit = [stripped], True
    else:
        raise DataError(source, "no such file or folder")
    if explicit and kind_of(stripped) is None:
        raise DataError(source, f"unsupported file type {PurePosixPath(stripped).suffix!r} "
                                f"(videos: {' '.join(VIDEO_EXTENSIONS)}; images: {' '.join(IMAGE_EXTENSIONS)})")
    data_files = [p for p in found if kind_of(p) is not None]
    if not data_files:
        raise DataError(source, "no video or image files found")
    return [fs.unstrip_protocol(p) if is_url(source) else p for p in data_files]


class _CaptionFinder:
    """Caption lookup for one list_items call; caches each folder's metadata.jsonl."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.metadata: dict[str, dict[str, str]] = {}

    def sidecar(self, path: str) -> str | None:
        fs, stripped = fsspec.core.url_to_fs(path)
        txt = posixpath.splitext(stripped)[0] + ".txt"
        if not fs.isfile(txt):
            return None
        text = fs.cat_file(txt).decode("utf-8").strip()
        if not text:
            raise DataError(txt, "empty caption file")
        return text

    def folder_metadata(self, path: str) -> dict[str, str]:
        fs, stripped = fsspec.core.url_to_fs(path)
        folder = posixpath.dirname(stripped)
        if folder not in self.metadata:
            self.metadata[folder] = _read_metadata(fs, posixpath.join(folder, METADATA_FILE))
        return self.metadata[folder]

    def __call__(self, path: str) -> str:
        source = self.spec.caption_source
        if source == "fixed":
            return str(self.spec.caption)
        name = posixpath.basename(fsspec.core.url_to_fs(path)[1])
        if source in ("auto", "sidecar") and (text := self.sidecar(path)) is not None:
            return text
        if source == "sidecar":
            raise DataError(path, f"no caption: expected a sidecar {posixpath.splitext(name)[0]}.txt next to it")
        if source in ("auto", "metadata") and (text := self.folder_metadata(path).get(name)) is not None:
            return text
        if source == "metadata":
            raise DataError(path, f"no caption: {METADATA_FILE} in its folder has no entry with file_name {name!r}")
        if self.spec.caption:
            return self.spec.caption
        raise DataError(path, f"no caption: no sidecar .txt, no {METADATA_FILE} entry, "
                              "and the dataset sets no fallback `caption`")


def _read_metadata(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, str]:
    if not fs.isfile(path):
        return {}
    captions: dict[str, str] = {}
    for number, line in enumerate(fs.cat_file(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[posixpath.basename(str(entry["file_name"]))] = str(entry["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(path, f"line {number}: expected {{\"file_name\": ..., \"text\": ...}} ({error!r})") \
                from None
    return captions


def list_items(spec: DatasetSpec) -> list[SourceItem]:
    """The dataset's files sorted by path, each with its caption and kind; video_index = sorted position."""
    paths = sorted({path for source in spec.sources for path in _expand(source)})
    kinds = {path: kind_of(path) for path in paths}
    if spec.kind is not None:
        paths = [p for p in paths if kinds[p] == spec.kind]
        if not paths:
            raise DataError(", ".join(spec.sources), f"no {spec.kind} files found")
    elif len(set(kinds.values())) > 1:
        raise DataError(", ".join(spec.sources), "mixes videos and images: set `kind` to pick one")
    caption_of = _CaptionFinder(spec)
    return [SourceItem(path=path, video_index=index, caption=caption_of(path), kind=kinds[path])  # type: ignore[arg-type]
            for index, path in enumerate(paths)]
