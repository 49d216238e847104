"""Optimizer steps behind a small interface, so the same loop runs on plain torch or DeepSpeed.

The loop computes every adapter's gradient from that adapter's own loss (train/step.py: each path's
backward runs inside its own routing context, which gradient checkpointing's recomputation needs)
and hands the engine `{"spatial_2": grads, "temporal": grads}`. Only then does any weight change:
the reference code steps the spatial optimizer in place before the temporal backward, which fails
in fp32 (method.md). An adapter without gradients this step is not stepped at all: no momentum, no
weight decay, no step count.

`TorchEngine`: one AdamW per path (spatial, temporal), one param group per adapter; torch's AdamW
skips parameters whose `.grad` is None.
`DeepSpeedEngine`: one DeepSpeed engine per adapter (ZeRO partitions flat buffers, where a missing
gradient would read as zero and still move momentum and weight decay); each wraps a parameter-only
module, receives the gradients through a surrogate loss Σ⟨p, g⟩ (whose gradient is exactly g) and
is stepped only when its adapter has gradients. See docs/training.md.

Data parallelism (train/ranks.py): every rank hands `step` the sum of its gradients over its draws
and how many draws computed each adapter; every rank calls it every step. The update is the mean
over all ranks' draws that computed the adapter, identical on every rank, and an adapter no draw of
any rank computed is not stepped. `TorchEngine` all-reduces the gradients itself; `DeepSpeedEngine`
all-reduces only the counts (and the fp16 overflow flag), steps every adapter some rank computed on
every rank (zeros where a rank has none) and lets ZeRO average the gradients, pre-scaled so that
its mean over ranks is the mean over the draws.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Protocol

import torch
from torch import nn

from motiondirector.config import EngineSection, OptimizerSection
from motiondirector.train.ranks import Ranks

# {path: {adapter: parameters}}, e.g. {"spatial": {"spatial_0": [...]}, "temporal": {"temporal": [...]}}
ParameterPaths = dict[str, dict[str, list[nn.Parameter]]]
# {adapter: gradients of its parameters, in adapter_parameters order}
AdapterGradients = dict[str, list[torch.Tensor]]
# {adapter: how many draws computed its gradient}
DrawCounts = dict[str, int]


class LossScaler:
    """Dynamic loss scaling for fp16 autocast: scale up the loss, unscale the gradients, skip on overflow."""

    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def unscale(self, grads: AdapterGradients) -> AdapterGradients | None:
        """`grads` divided by the scale, or None (and a smaller scale) if any is inf/nan: skip the step."""
        if not self.enabled:
            return grads
        scale = self.scale
        if not self.record(all_finite(grads)):
            return None
        return {name: [g / scale for g in gs] for name, gs in grads.items()}

    def record(self, finite: bool) -> bool:
        """Adapt the scale to a step whose gradients were (not) all finite; returns whether to step."""
        if not self.enabled:
            return True
        if not finite:
            self.scale /= 2.0
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def all_finite(grads: AdapterGradients) -> bool:
    return all(bool(torch.isfinite(g).all()) for gs in grads.values() for g in gs)


class Engine(Protocol):
    """What the loop needs: optimizers for the adapters, a loss scale, a step, (re)stored state."""

    scaler: LossScaler  # losses are multiplied by scaler.scale before differentiation

    def prepare(self, paths: ParameterPaths, optimizer: OptimizerSection, fp16_loss_scaling: bool,
                ranks: Ranks = Ranks()) -> None: ...

    def step(self, grads: AdapterGradients, counts: DrawCounts | None = None) -> list[str]:
        """Update the adapters some draw of some rank computed, with the mean of their (scaled) gradients.

        `grads`: this rank's sum over its draws per adapter; `counts`: how many of its draws computed
        each (None: one each). Called by every rank every step; returns the names updated, the same
        on every rank (none when the fp16 loss scale overflowed).
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state to checkpoint; called by every rank (it may gather), kept from rank 0."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (rank 0's, given to every rank)."""
        ...


def flat_groups(paths: ParameterPaths) -> dict[str, list[nn.Parameter]]:
    return {adapter: params for adapters in paths.values() for adapter, params in adapters.items()}


def sum_over_ranks(grads: AdapterGradients, counts: DrawCounts, groups: dict[str, list[nn.Parameter]],
                   ranks: Ranks) -> tuple[AdapterGradients, DrawCounts]:
    """Every rank's gradient sums and draw counts summed over the ranks, in one all-reduce.

    A rank without an adapter's gradient adds zeros; adapters no rank computed are left out.
    """
    if not ranks.distributed:
        return grads, counts
    names = list(groups)  # the plan's order, the same on every rank
    device = groups[names[0]][0].device
    pieces = [grad.reshape(-1).float() for adapter in names
              for grad in grads.get(adapter, [torch.zeros(p.numel(), device=device) for p in groups[adapter]])]
    pieces.append(torch.tensor([float(counts.get(adapter, 0)) for adapter in names], device=device))
    flat = ranks.all_reduce(torch.cat(pieces))
    totals = [round(value) for value in flat[-len(names):].tolist()]
    summed, offset = {}, 0
    for adapter, total in zip(names, totals, strict=True):
        views = []
        for param in groups[adapter]:
            views.append(flat[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        if total:
            summed[adapter] = views
    return summed, {adapter: total for adapter, total in zip(names, totals, strict=True) if total}


class TorchEngine:
    """Plain torch: one AdamW per path (the reference's two optimizers), one param group per adapter."""

    def __init__(self) -> None:
        self.groups: dict[str, list[nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.AdamW] = {}
        self.path_of: dict[str, str] = {}
        self.scaler = LossScaler(False)
        self.ranks = Ranks()

    def prepare(self, paths: ParameterPaths, optimizer: OptimizerSection, fp16_loss_scaling: bool,
                ranks: Ranks = Ranks()) -> None:
        self.groups = flat_groups(paths)
        self.ranks = ranks
        self.path_of = {adapter: path for path, adapters in paths.items() for adapter in adapters}
        self.scaler = LossScaler(fp16_loss_scaling)
        self.optimizers = {
            path: torch.optim.AdamW([{"params": params, "adapter": adapter} for adapter, params in adapters.items()],
                                    lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                    weight_decay=optimizer.weight_decay)
            for path, adapters in paths.items()
        }

    def step(self, grads: AdapterGradients, counts: DrawCounts | None = None) -> list[str]:
        grads, counts = sum_over_ranks(grads, counts or dict.fromkeys(grads, 1), self.groups, self.ranks)
        # The mean over the draws; an inf/nan of any rank reached every rank through the sum.
        grads = self.scaler.unscale({adapter: gs if counts[adapter] == 1 else [g / counts[adapter] for g in gs]
                                     for adapter, gs in grads.items()})
        if grads is None:
            return []
        for adapter, adapter_grads in grads.items():
            for param, grad in zip(self.groups[adapter], adapter_grads, strict=True):
                param.grad = grad
        for path in sorted({self.path_of[adapter] for adapter in grads}):
            self.optimizers[path].step()  # parameters with grad None (other adapters) are skipped
            self.optimizers[path].zero_grad(set_to_none=True)
        return sorted(grads)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {path: opt.state_dict() for path, opt in self.optimizers.items()},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for path, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][path])
        self.scaler.load_state_dict(state["scaler"])


class _ParameterHolder(nn.Module):
    """The module DeepSpeed wraps: it only owns (shares) one adapter's parameters; the UNet runs outside."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


# ZeRO optimizer state keys that are plain tensors/numbers (loadable with weights_only=True) and
# enough to restore a world-size-1..N run; the rest are DeepSpeed objects or derived bookkeeping.
_ZERO_STATE_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings",
                    "param_alignment_paddings", "partition_count", "ds_version", "clip_grad",
                    "dynamic_loss_scale", "overflow")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed; alone (no launcher) as a world of size 1."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_initialized():
        return
    # A launcher (Ray Train, deepspeed, torchrun) sets these; a plain process is rank 0 of 1.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage 2 by default), one DeepSpeed engine per adapter, fp32 master weights.

    Mixed precision stays in the loop's autocast; DeepSpeed's own fp16/bf16 modes would cast the
    LoRA weights inside the UNet. Gradient clipping is off, as in the torch engine.
    """

    def __init__(self, zero_stage: int = 2) -> None:
        self.zero_stage = zero_stage
        self.groups: dict[str, list[nn.Parameter]] = {}
        self.engines: dict[str, Any] = {}
        self.scaler = LossScaler(False)
        self.ranks = Ranks()

    def _config(self, optimizer: OptimizerSection) -> dict[str, Any]:
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
            "steps_per_print": 2 ** 31 - 1,
            "zero_optimization": {"stage": self.zero_stage},
            # torch's AdamW: the same update as TorchEngine, and no CPU-Adam extension to compile.
            "optimizer": {"type": "AdamW", "params": {
                "lr": optimizer.lr, "betas": list(optimizer.betas), "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay, "torch_adam": True}},
        }

    def prepare(self, paths: ParameterPaths, optimizer: OptimizerSection, fp16_loss_scaling: bool,
                ranks: Ranks = Ranks()) -> None:
        import deepspeed

        ensure_distributed()
        self.groups = flat_groups(paths)
        self.ranks = ranks
        self.scaler = LossScaler(fp16_loss_scaling)
        config = self._config(optimizer)
        for adapter, params in self.groups.items():
            engine, *_ = deepspeed.initialize(model=_ParameterHolder(params), model_parameters=params,
                                              config=config)
            self.engines[adapter] = engine

    def step(self, grads: AdapterGradients, counts: DrawCounts | None = None) -> list[str]:
        counts = counts or dict.fromkeys(grads, 1)
        finite = not self.scaler.enabled or all_finite(grads)
        if self.ranks.distributed:
            # Which adapters some rank computed, and whether any rank overflowed, agreed by all ranks:
            # they must call backward/step on the same DeepSpeed engines (collectives inside).
            names = list(self.groups)
            totals = self.ranks.all_reduce(torch.tensor([float(counts.get(a, 0)) for a in names] + [float(not finite)]))
            counts = {a: round(n) for a, n in zip(names, totals[:-1].tolist(), strict=True) if round(n)}
            finite = float(totals[-1]) == 0
        scale = self.scaler.scale
        if not self.scaler.record(finite):
            return []
        for adapter, total in counts.items():
            params = self.groups[adapter]
            local = grads.get(adapter) or [torch.zeros_like(p) for p in params]
            # ZeRO averages over the ranks: pre-scaled, that average is the mean over the draws.
            factor = self.ranks.world_size / (total * scale)
            engine = self.engines[adapter]
            engine.backward(sum((p * (g * factor)).sum() for p, g in zip(params, local, strict=True)))
            engine.step()
        return sorted(counts)

    def state_dict(self) -> dict[str, Any]:
        """ZeRO partitions the optimizer state over the ranks: every rank's partition, gathered."""
        optimizers = {}
        for adapter, engine in self.engines.items():
            state = engine.optimizer.state_dict()
            own = {key: state[key] for key in _ZERO_STATE_KEYS if key in state}
            optimizers[adapter] = {"global_steps": engine.global_steps, "partitions": self.ranks.gather(own)}
        return {"optimizers": optimizers, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for adapter, engine in self.engines.items():
            saved = state["optimizers"][adapter]
            # Checkpoints from before data parallelism hold the one partition of a world of one.
            partitions = saved.get("partitions") or [{k: v for k, v in saved.items() if k != "global_steps"}]
            if len(partitions) != self.ranks.world_size:
                raise ValueError(f"the checkpoint's DeepSpeed state was written by {len(partitions)} ranks; "
                                 f"resume it with {len(partitions)}, not {self.ranks.world_size}")
            engine.global_steps = saved["global_steps"]
            # DeepSpeed takes every rank's partition and loads its own (by its data-parallel rank).
            engine.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
        self.scaler.load_state_dict(state["scaler"])


def make_engine(section: EngineSection) -> Engine:
    if section.kind == "deepspeed":
        return DeepSpeedEngine(section.zero_stage)
    return TorchEngine()

