"""Which LoRA adapters a run trains and which training clips route to which spatial adapter.

Adapters are named peft adapters side by side on the UNet: `temporal` (not in spatial_only) and
`spatial_<k>`. Spatial routing (method.md): per_video = one spatial LoRA per training video (all
clips of a video share it; k follows the dataset's sorted file order), shared = one for all,
per_clip = one per clip (the reference code's behaviour). Routing picks the active adapter names for
a step; nothing is nested.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from motiondirector.backbones.base import BackboneSpec
from motiondirector.config import TrainConfig
from motiondirector.data.records import CacheRecord
from motiondirector.lora.inject import LoraSettings, adapter_parameters, add_adapter, remove_adapter

TEMPORAL = "temporal"


def spatial_name(index: int) -> str:
    return f"spatial_{index}"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    kind: str  # "spatial" | "temporal"
    index: int | None  # k of OUT/spatial/<k>; None for the temporal adapter
    targets: tuple[str, ...]
    records: tuple[int, ...]  # positions in the run's record list this adapter trains on


@dataclass(frozen=True)
class AdapterPlan:
    routing: str
    spatial: tuple[AdapterSpec, ...]
    temporal: AdapterSpec | None
    spatial_of_record: tuple[int, ...]  # record position -> k

    @property
    def adapters(self) -> tuple[AdapterSpec, ...]:
        return (*self.spatial, *([self.temporal] if self.temporal else []))

    def spatial_for(self, record: int) -> str:
        return spatial_name(self.spatial_of_record[record])

    def parameter_paths(self, model: nn.Module) -> dict[str, dict[str, list[nn.Parameter]]]:
        """{path: {adapter: parameters}} for the engine: one optimizer per path."""
        paths = {"spatial": {a.name: adapter_parameters(model, a.name) for a in self.spatial}}
        if self.temporal is not None:
            paths["temporal"] = {self.temporal.name: adapter_parameters(model, self.temporal.name)}
        return paths

    def inference_adapters(self, mode: str) -> list[str]:
        """Adapters for validation samples: the motion alone (the paper's inference), except where the
        run has no motion LoRA (spatial_only: the first appearance LoRA) or trained one LoRA set (coupled)."""
        if mode == "spatial_only":
            return [self.spatial[0].name]
        if mode == "coupled":
            return [a.name for a in self.adapters]
        return [TEMPORAL]


def _routing_key(routing: str, position: int, record: CacheRecord) -> int:
    if routing == "per_video":
        return record.video_index
    if routing == "per_clip":
        return position
    return 0


def plan_adapters(config: TrainConfig, records: list[CacheRecord], backbone: BackboneSpec) -> AdapterPlan:
    images = all(r.is_image for r in records)
    routing = config.routing(images)
    keys = [_routing_key(routing, position, record) for position, record in enumerate(records)]
    index_of = {key: k for k, key in enumerate(sorted(set(keys)))}
    spatial_of_record = tuple(index_of[key] for key in keys)
    spatial_targets = tuple(backbone.spatial_lora_targets())
    spatial = tuple(
        AdapterSpec(spatial_name(k), "spatial", k, spatial_targets,
                    tuple(p for p, owner in enumerate(spatial_of_record) if owner == k))
        for k in range(len(index_of)))
    temporal = None
    if config.mode_for(images) != "spatial_only":
        temporal = AdapterSpec(TEMPORAL, "temporal", None, tuple(backbone.temporal_lora_targets()),
                               tuple(range(len(records))))
    return AdapterPlan(routing, spatial, temporal, spatial_of_record)


@contextmanager
def installed_adapters(model: nn.Module, plan: AdapterPlan, settings: LoraSettings, seed: int) -> Iterator[None]:
    """Inject the plan's adapters (seeded, fp32, trainable) for the duration; remove them afterwards so
    a caller's backbone can train again."""
    try:
        for adapter in plan.adapters:
            # Each adapter's initialisation depends on the run seed and its own name only.
            offset = 1 if adapter.index is None else 2 + adapter.index
            add_adapter(model, adapter.name, list(adapter.targets), settings, seed=seed + offset)
            for param in adapter_parameters(model, adapter.name):
                # fp32 master weights even when the frozen model is fp16/bf16 (autocast computes in low precision).
                param.data = param.data.float()
                param.requires_grad_(True)
        yield
    finally:
        for adapter in plan.adapters:
            remove_adapter(model, adapter.name)
