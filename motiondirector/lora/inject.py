"""LoRA adapters on a denoiser, through peft: inject, route (activate by name), scale, read, write, fuse.

Several named adapters live side by side in the same peft layers (e.g. `temporal`, `spatial_0`,
`spatial_1`, or at inference `motion_0` + `appearance_0`). Routing is choosing which names are
active for a forward pass — no nested wrappers, so a run with many spatial LoRAs stays flat.
Each adapter computes `W0 x + scale · (alpha / r) · B A x`; with alpha = r (the default, as the
reference code) the scale is the paper's γ.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from motiondirector.lora.package import LoraKind, Manifest, check_compatible, read_package
from motiondirector.lora.settings import LoraSettings


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model: nn.Module) -> set[str]:
    return {adapter for _, layer in lora_layers(model) for adapter in layer.lora_A}


def add_adapter(model: nn.Module, name: str, targets: list[str], settings: LoraSettings,
                seed: int | None = None) -> None:
    """Inject adapter `name` on `targets`. Initialisation: down ~ N(0, 1/r), up = 0 (the reference's)."""
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists on this model")
    missing = sorted(set(targets) - {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLayer))})
    if missing:
        raise ValueError(f"adapter {name!r}: target modules not found in the model: {missing[:5]}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    fork = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():
            # Several named adapters on one model is the design here, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(settings.peft_config(targets), model, adapter_name=name)
    # peft activates only the newest adapter per injection call; routing is ours, so start inactive.
    activate(model, [])


def remove_adapter(model: nn.Module, name: str) -> None:
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)


class Router:
    """Routing over a fixed set of LoRA layers, found once: a module walk of a full-size UNet takes
    tens of milliseconds, too slow to repeat for every forward pass of a training loop. Create it
    after the adapters are injected."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [layer for _, layer in lora_layers(model)]

    def activate(self, names: Iterable[str]) -> None:
        names = list(names)
        for layer in self.layers:
            layer._active_adapter = names

    @contextlib.contextmanager
    def active(self, names: Iterable[str]) -> Iterator[None]:
        previous = [list(layer.active_adapters) for layer in self.layers]
        self.activate(names)
        try:
            yield
        finally:
            for layer, names_before in zip(self.layers, previous, strict=True):
                layer._active_adapter = names_before


def activate(model: nn.Module, names: Iterable[str]) -> None:
    """Make exactly `names` active (an empty list: the base model). Never changes requires_grad."""
    Router(model).activate(names)


def active(model: nn.Module, names: Iterable[str]) -> contextlib.AbstractContextManager[None]:
    """Route a forward pass through `names`, restoring the previous routing afterwards."""
    return Router(model).active(names)


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """W = W0 + scale · ΔW for adapter `name` (ΔW includes alpha / r)."""
    for _, layer in lora_layers(model):
        layer.set_scale(name, scale)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    params = []
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return params


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT-layout weights of one adapter: `<module>.lora_A.weight` (r×in), `<module>.lora_B.weight` (out×r)."""
    state = {}
    for module_name, layer in lora_layers(model):
        if name in layer.lora_A:
            state[f"{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach().clone().cpu()
            state[f"{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach().clone().cpu()
    return state


def load_adapter_weights(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-layout weights into adapter `name`; every module and shape must match exactly."""
    layers = {module_name: layer for module_name, layer in lora_layers(model) if name in layer.lora_A}
    expected = {f"{m}.lora_{ab}.weight" for m in layers for ab in "AB"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter {name!r}: weights do not match its modules; missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    with torch.no_grad():
        for module_name, layer in layers.items():
            for ab, holder in (("A", layer.lora_A[name]), ("B", layer.lora_B[name])):
                tensor = state[f"{module_name}.lora_{ab}.weight"]
                if tuple(tensor.shape) != tuple(holder.weight.shape):
                    raise ValueError(f"adapter {name!r}: {module_name}.lora_{ab} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(holder.weight.shape)}")
                holder.weight.copy_(tensor.to(holder.weight.dtype))


def fuse(model: nn.Module, names: Iterable[str]) -> None:
    """Fold `names` (at their current scales) into the base weights: zero overhead at inference."""
    names = list(names)
    for _, layer in lora_layers(model):
        present = [n for n in names if n in layer.lora_A]
        if present:
            layer.merge(adapter_names=present)


def unfuse(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        while layer.merged:
            layer.unmerge()


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of `model`, also of those already wrapped by a LoRA layer."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        elif ".base_layer" in name or ".lora_" in name:  # peft's inner Linears are not model modules
            continue
        if isinstance(module, nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def apply_package(model: nn.Module, architecture: str, folder: str | Path, name: str, *,
                  expected_kind: LoraKind | None = None, scale: float = 1.0) -> Manifest:
    """Load a package into `model` as adapter `name` at `scale` (W0 + scale·ΔW), after checking it fits.

    `architecture` is the model's `BackboneSpec.architecture_fingerprint`. The adapter is added
    inactive: route it with `activate`/`active`.
    """
    manifest, state = read_package(folder)
    check_compatible(manifest, architecture, linear_shapes(model), str(folder), expected_kind, state=state)
    add_adapter(model, name, manifest.targets, manifest.settings)
    load_adapter_weights(model, name, state)
    set_scale(model, name, scale)
    return manifest
