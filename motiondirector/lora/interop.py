"""Moving LoRAs between tools: reference-implementation import, kohya export/import, merged export.

- Reference files (`torch.save` of a key-less list `[up, down, up, down, ...]`, see docs/method.md):
  the order of the base's target modules is the only key, so the base must be given.
- kohya / ComfyUI key scheme: `lora_unet_<module path, dots as underscores>.lora_down.weight`
  (r×in), `.lora_up.weight` (out×r) and `.alpha` in one safetensors file; scale = alpha / r, as in
  peft, so packages convert without touching the numbers.
- Merged export: a diffusers model folder whose UNet has the LoRA folded into its weights
  (W0 + γ·ΔW), loadable by diffusers' `TextToVideoSDPipeline` with no LoRA code at all.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from motiondirector.backbones.base import BackboneSpec
from motiondirector.lora import inject
from motiondirector.lora.inject import apply_package, linear_shapes
from motiondirector.lora.package import (
    ADAPTER_WEIGHTS,
    BaseModelRef,
    LoraKind,
    Manifest,
    PackageError,
    check_compatible,
    read_package,
    write_package,
)
from motiondirector.lora.targets import targets_for
from motiondirector.storage import atomic_write, sha256_file, staged_folder

# The transformer class whose Linears a reference file's LoRAs belong to, per kind.
REFERENCE_MODULE_CLASSES: dict[str, str] = {"spatial": "Transformer2DModel", "temporal": "TransformerTemporalModel"}
KOHYA_PREFIX = "lora_unet_"
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
EXPORT_RECORD = "motiondirector_export.json"


def _base_ref(backbone: BackboneSpec) -> BaseModelRef:
    return BaseModelRef(model_id=backbone.model_id, architecture=backbone.architecture_fingerprint)


def _source(file: Path, file_format: str, **extra: Any) -> dict[str, Any]:
    return {"imported_from": {"format": file_format, "file": str(file.resolve()), "sha256": sha256_file(file),
                              **extra}}


# --- reference-implementation files -------------------------------------------------------------

def reference_module_order(backbone: BackboneSpec, kind: LoraKind) -> list[str]:
    """Target Linears in the reference file's order: per transformer of the kind's class (in
    `unet.named_modules()` order), its matching Linears in its own `named_modules()` order."""
    wanted = set(targets_for(backbone, kind))
    class_name = REFERENCE_MODULE_CLASSES[kind]
    order: list[str] = []
    for name, module in backbone.unet.named_modules():
        if type(module).__name__ != class_name:
            continue
        for inner, _ in module.named_modules():
            full = f"{name}.{inner}" if inner else name
            if full in wanted and full not in order:
                order.append(full)
    if set(order) != wanted:
        raise ValueError(f"{len(wanted - set(order))} {kind} LoRA targets lie outside {class_name} modules: "
                         "this base's layout does not match the reference implementation's")
    return order


def _load_tensor_list(file: Path) -> list[torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means "not this format"
        raise PackageError(f"{file}: cannot be read as a reference LoRA file with torch.load(weights_only=True) "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(loaded, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in loaded):
        raise PackageError(f"{file}: expected a list of tensors [up_0, down_0, up_1, down_1, ...], "
                           f"got {type(loaded).__name__}")
    return list(loaded)


def read_reference_loras(file: str | Path, kind: LoraKind, backbone: BackboneSpec) -> list[tuple[Manifest, dict]]:
    """All LoRAs of a reference file as (manifest, PEFT-layout state) — one per training clip for spatial files."""
    file = Path(file)
    tensors = _load_tensor_list(file)
    order = reference_module_order(backbone, kind)
    shapes = linear_shapes(backbone.unet)
    per_lora = 2 * len(order)
    if not tensors or len(tensors) % per_lora:
        raise PackageError(f"{file}: holds {len(tensors)} tensors, but a {kind} file for this base holds "
                           f"2 x {len(order)} target modules x N LoRAs (a multiple of {per_lora}); "
                           "wrong --kind or wrong --base?")
    count = len(tensors) // per_lora
    if kind == "temporal" and count != 1:
        raise PackageError(f"{file}: holds {count} LoRAs per module, but a temporal file holds exactly one "
                           "(is it a spatial file? use --kind spatial)")
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    rank = tensors[0].shape[-1] if tensors[0].ndim == 2 else 0  # up_0 is (out, r); all LoRAs share r
    for position, module in enumerate(order):
        out_features, in_features = shapes[module]
        for k in range(count):
            at = 2 * (position * count + k)
            up, down = tensors[at], tensors[at + 1]
            if up.shape != (out_features, rank) or down.shape != (rank, in_features):
                raise PackageError(
                    f"{file}: tensors {at} and {at + 1} (LoRA {k} of {module}) have shapes {tuple(up.shape)} "
                    f"and {tuple(down.shape)}; expected up ({out_features}, r) and down (r, {in_features}) "
                    f"with r = {rank}")
            states[k][f"{module}.lora_A.weight"] = down.float().contiguous()
            states[k][f"{module}.lora_B.weight"] = up.float().contiguous()
    # The reference applies up(down(x)) with no alpha/r factor: alpha = rank.
    return [(Manifest(kind=kind, base=_base_ref(backbone), rank=rank, alpha=float(rank), targets=order,
                      training_config=_source(file, "motiondirector-reference", index=k, loras_in_file=count)),
             state) for k, state in enumerate(states)]


def import_reference(file: str | Path, kind: LoraKind, backbone: BackboneSpec, out: str | Path,
                     index: int | None = None) -> list[Path]:
    """Write package(s) from a reference file: LoRA `index` to `out`, or all N as `out/0 ... out/N-1`
    (a file with one LoRA goes to `out` itself)."""
    loras = read_reference_loras(file, kind, backbone)
    out = Path(out)
    if index is not None:
        if not 0 <= index < len(loras):
            raise ValueError(f"--index {index}: {file} holds {len(loras)} {kind} LoRA(s) (0..{len(loras) - 1})")
        return [write_package(out, loras[index][1], loras[index][0])]
    if len(loras) == 1:
        return [write_package(out, loras[0][1], loras[0][0])]
    return [write_package(out / str(k), state, manifest) for k, (manifest, state) in enumerate(loras)]


# --- kohya ------------------------------------------------------------------------------------

def kohya_prefix(module: str) -> str:
    return KOHYA_PREFIX + module.replace(".", "_")


def export_kohya(package: str | Path, out_file: str | Path) -> Path:
    """One safetensors file with the kohya key scheme (weights and alpha unchanged)."""
    manifest, state = read_package(package)
    tensors = {}
    for module in manifest.targets:
        prefix = kohya_prefix(module)
        tensors[f"{prefix}.lora_down.weight"] = state[f"{module}.lora_A.weight"]
        tensors[f"{prefix}.lora_up.weight"] = state[f"{module}.lora_B.weight"]
        tensors[f"{prefix}.alpha"] = torch.tensor(float(manifest.alpha))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(manifest.rank),
                "ss_network_alpha": str(manifest.alpha), "motiondirector_kind": manifest.kind,
                "motiondirector_base": manifest.base.model_id,
                "motiondirector_architecture": manifest.base.architecture}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_file, safetensors_bytes(tensors, metadata=metadata))
    return out_file


def read_kohya(file: str | Path, kind: LoraKind, backbone: BackboneSpec) -> tuple[Manifest, dict]:
    """A kohya-scheme safetensors file -> (manifest, PEFT-layout state) for `backbone`."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # a header safetensors cannot parse
        raise PackageError(f"{file}: not a safetensors file ({error})") from None
    if metadata.get("motiondirector_kind", kind) != kind:
        raise PackageError(f"{file}: was exported as a {metadata['motiondirector_kind']} LoRA, not {kind}")
    shapes = linear_shapes(backbone.unet)
    by_prefix = {kohya_prefix(name): name for name in shapes}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, part = key.partition(".")
        if part not in _KOHYA_PARTS:
            raise PackageError(f"{file}: key {key!r} is not <module>.lora_down.weight / .lora_up.weight / .alpha")
        if prefix not in by_prefix:
            what = "text-encoder LoRAs are not supported" if prefix.startswith("lora_te") else \
                "no such Linear in the base model"
            raise PackageError(f"{file}: key {key!r}: {what}")
        parts.setdefault(by_prefix[prefix], {})[part] = tensor
    allowed = targets_for(backbone, kind)
    modules = [name for name in allowed if name in parts]
    strangers = sorted(set(parts) - set(allowed))
    if strangers:
        raise PackageError(f"{file}: {len(strangers)} modules are not {kind} LoRA targets, e.g. {strangers[0]}")
    if not modules:
        raise PackageError(f"{file}: holds no LoRA weights")
    state, ranks, alphas = {}, set(), set()
    for module in modules:
        found = parts[module]
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            raise PackageError(f"{file}: {kohya_prefix(module)} needs both lora_down.weight and lora_up.weight")
        down, up = found["lora_down.weight"], found["lora_up.weight"]
        ranks.add(down.shape[0])
        alphas.add(float(found["alpha"]) if "alpha" in found else float(down.shape[0]))  # kohya: no alpha = rank
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = down.float(), up.float()
    if len(ranks) != 1 or len(alphas) != 1:
        raise PackageError(f"{file}: modules have different ranks {sorted(ranks)} or alphas {sorted(alphas)}; "
                           "a package has one of each")
    manifest = Manifest(kind=kind, base=_base_ref(backbone), rank=ranks.pop(), alpha=alphas.pop(), targets=modules,
                        training_config=_source(file, "kohya"))
    check_compatible(manifest, backbone.architecture_fingerprint, shapes, str(file), state=state)
    return manifest, state


def import_kohya(file: str | Path, kind: LoraKind, backbone: BackboneSpec, out: str | Path) -> Path:
    manifest, state = read_kohya(file, kind, backbone)
    return write_package(out, state, manifest)


# --- merged export --------------------------------------------------------------------------------

@contextlib.contextmanager
def plain_linears(model: nn.Module) -> Iterator[None]:
    """Put each LoRA layer's base Linear in its place for the duration (after `inject.fuse` they carry
    the result): the model is then plain diffusers modules, with no per-call LoRA dispatch."""
    swapped = []
    for name, layer in list(inject.lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
        swapped.append((parent, child, layer))
    try:
        yield
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _stored_dtype(unet_folder: Path) -> torch.dtype:
    """The dtype the base's UNet weights are stored in (exports keep it)."""
    for file in sorted(unet_folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                return _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def export_merged(packages: list[tuple[str | Path, float]], base: str, out: str | Path) -> Path:
    """A diffusers folder = `base` with every (package, scale) fused into the UNet (on CPU, in fp32)."""
    from motiondirector.backbones import load_backbone, resolve_model_folder

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty")
    if not packages:
        raise ValueError("nothing to export: give at least one package")
    source = resolve_model_folder(base)
    backbone = load_backbone(base, "cpu", torch.float32)
    unet = backbone.unet
    records = []
    for position, (package, scale) in enumerate(packages):
        manifest = apply_package(unet, backbone.architecture_fingerprint, package, f"export_{position}",
                                 scale=scale)
        records.append({"package": str(Path(package).resolve()), "kind": manifest.kind, "scale": scale,
                        "weights_sha256": sha256_file(Path(package) / ADAPTER_WEIGHTS)})
    names = [f"export_{i}" for i in range(len(packages))]
    inject.activate(unet, names)
    inject.fuse(unet, names)
    with staged_folder(out) as staging:  # the folder appears complete or not at all
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", ".*"))
        with plain_linears(unet):
            unet.to(_stored_dtype(source / "unet")).save_pretrained(staging / "unet", safe_serialization=True)
        (staging / EXPORT_RECORD).write_text(json.dumps(
            {"base": backbone.model_id, "architecture": backbone.architecture_fingerprint, "fused": records},
            indent=2))
    return out
