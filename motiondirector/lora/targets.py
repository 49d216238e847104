"""Target sets and their LoRA sizes: what `motiondirector targets` reports."""

from __future__ import annotations

from torch import nn

from motiondirector.backbones.base import BackboneSpec

KINDS = ("spatial", "temporal")


def targets_for(backbone: BackboneSpec, kind: str) -> list[str]:
    if kind == "spatial":
        return backbone.spatial_lora_targets()
    if kind == "temporal":
        return backbone.temporal_lora_targets()
    raise ValueError(f"LoRA kind must be one of {KINDS}, got {kind!r}")


def lora_parameter_count(model: nn.Module, targets: list[str], rank: int) -> int:
    """Parameters of rank-`rank` LoRAs on `targets`: r·(in + out) per Linear."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[name].in_features + modules[name].out_features) for name in targets)


def target_summary(model: nn.Module, spatial: list[str], temporal: list[str], rank: int) -> dict:
    return {
        kind: {"modules": len(names), "params": lora_parameter_count(model, names, rank), "targets": names}
        for kind, names in (("spatial", spatial), ("temporal", temporal))
    }
