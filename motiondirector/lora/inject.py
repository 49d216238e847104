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
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn


@dataclass(frozen=True)
class LoraSettings:
    """Hyper-parameters of one adapter. alpha None means alpha = rank (scale factor 1)."""

    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.1

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def peft_config(self, targets: list[str]) -> LoraConfig:
        if not targets:
            raise ValueError("no LoRA target modules given")
        # Exact module names: peft matches a target as the full name or a dotted suffix of it.
        return LoraConfig(r=self.rank, lora_alpha=self.effective_alpha, lora_dropout=self.dropout,
                          target_modules=list(targets), init_lora_weights="gaussian", bias="none")


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


def state_dict_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names present in a PEFT-layout state dict, in key order."""
    return list(dict.fromkeys(key.rsplit(".lora_", 1)[0] for key in state))


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
