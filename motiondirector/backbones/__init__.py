"""Backbone loading: resolve `--base MODEL` to a folder, pick the family, check it fits, load it.

MODEL is an embedded name (`toy`), a local diffusers folder, or a Hugging Face hub id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import psutil
import torch

from motiondirector.backbones.base import (
    BackboneSpec,
    LatentDistribution,
    ModelNotAvailableError,
    ModelTooLargeError,
)
from motiondirector.backbones.defaults import ModelDefaults, model_defaults
from motiondirector.backbones.unet3d import UNet3DSpec
from motiondirector.storage import local_path

__all__ = [
    "BackboneSpec",
    "LatentDistribution",
    "ModelDefaults",
    "ModelNotAvailableError",
    "ModelTooLargeError",
    "load_backbone",
    "model_id",
    "resolve_device",
    "resolve_model_folder",
    "embedded_models",
    "defaults_for",
]

# Denoiser class name (unet/config.json `_class_name`) -> specification.
FAMILIES: dict[str, type[BackboneSpec]] = {UNet3DSpec.unet_class: UNet3DSpec}

_EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "toyworld"


def embedded_models() -> dict[str, Path]:
    """Models shipped inside the package, by name."""
    return {"toy": _EMBEDDED_ROOT / "model"}


def resolve_device(device: str | None = None) -> torch.device:
    """`auto`/None -> cuda if available else cpu; otherwise what torch understands."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return resolved


def resolve_model_folder(base: str) -> Path:
    """An embedded name, a local folder or a hub id -> a local diffusers folder."""
    embedded = embedded_models()
    if base in embedded:
        folder = embedded[base]
        if not (folder / "unet" / "config.json").exists():
            raise ModelNotAvailableError(
                f"embedded model {base!r} is missing its weights at {folder}; "
                "rebuild it with `motiondirector toyworld pretrain` or reinstall the package")
        return folder
    path = local_path(base)
    if path.exists():
        if not (path / "unet" / "config.json").exists():
            raise ModelNotAvailableError(
                f"{path} is not a diffusers model folder: expected {path / 'unet' / 'config.json'} "
                "(a folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return path
    if base.count("/") != 1 or base.startswith((".", "/")):
        raise ModelNotAvailableError(f"--base {base!r}: no such folder, and not a hub id of the form owner/name")
    return _hub_snapshot(base)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors", "tokenizer/*"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:
        raise ModelNotAvailableError(
            f"model {repo_id!r} is not available: it is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(error).__name__}). On a machine with internet run "
            f"`huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here and pass --base DIR "
            "(or fill HF_HOME's cache)") from error


def _parameter_count(folder: Path) -> int:
    """Parameters of all components, read from safetensors headers only (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*/*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def check_fits(folder: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse early, with an estimate, when the frozen weights alone exceed the device's free memory."""
    need = _parameter_count(folder) * torch.finfo(dtype).bits // 8
    have = _available_bytes(device)
    if need > have:
        raise ModelTooLargeError(
            f"{folder}: the weights alone need about {need / 2**30:.1f} GiB in {dtype} but {device} has "
            f"{have / 2**30:.1f} GiB free; use a larger device, --device cuda, or a lower precision")


def default_dtype(device: torch.device) -> torch.dtype:
    """Frozen-weight precision: fp32 on CPU, fp16 on GPU (as the reference configs)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_backbone(base: str, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> BackboneSpec:
    """Load `base` (see module doc) onto `device` with its family's specification."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype or default_dtype(device)
    folder = resolve_model_folder(base)
    config = json.loads((folder / "unet" / "config.json").read_text())
    class_name = config.get("_class_name")
    if class_name not in FAMILIES:
        raise ModelNotAvailableError(
            f"{folder / 'unet' / 'config.json'}: denoiser class {class_name!r} is not supported; "
            f"supported: {', '.join(FAMILIES)}")
    check_fits(folder, device, dtype)
    resolved_id = model_id(base)
    backbone = FAMILIES[class_name].from_folder(folder, model_id=resolved_id, device=device, dtype=dtype)
    backbone.defaults = model_defaults(resolved_id, folder)
    return backbone


def defaults_for(base: str) -> ModelDefaults:
    """The model-aware defaults of `base` without loading its weights (reads config files only)."""
    return model_defaults(model_id(base), resolve_model_folder(base))


def model_id(base: str) -> str:
    """The identity of `--base` in manifests and fingerprints: an embedded name or hub id as given; a
    local folder as its absolute, symlink-free path, however it was spelled (`~/m`, `./m`, `/home/me/m`)."""
    if base in embedded_models():
        return base
    path = local_path(base)
    return str(path.resolve()) if path.is_dir() else base
