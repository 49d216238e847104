"""Data-parallel training: who this process is, what it draws, and the few collectives the loop needs.

A run of `world_size` ranks takes `world_size × gradient_accumulation` *draws* per optimizer step.
Draw slot `g = rank × accumulation + j` (j-th accumulated draw of rank `rank`) has its own RNG
stream, derived from (seed, g, step) alone: the same seed gives the same run, ranks and accumulated
draws differ, and a resumed run continues every stream exactly without storing any generator state.
Slot g samples among its shard of the records (`shard`), so the ranks of a step train on different
clips. A run of 2 ranks and a run of 1 rank accumulating 2 draws therefore take the same draws, and
(the gradients being averaged over the draws) the same steps.

Without torch.distributed this is a world of one; `world_size > 1` needs an initialised process
group (torchrun, Ray Train, DeepSpeed's launcher). Collective tensors live on the CUDA device under
NCCL and on the CPU otherwise (gloo).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")
DRAW, DROPOUT = 0, 1  # the purposes of a slot's streams: the step's draws, and LoRA dropout


def stream_seed(seed: int, slot: int, step: int, purpose: int) -> int:
    """A 63-bit seed for (run seed, draw slot, step, purpose); independent-looking for any inputs."""
    digest = hashlib.blake2b(f"motiondirector:{seed}:{slot}:{step}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_generator(seed: int, slot: int, step: int) -> torch.Generator:
    """The CPU generator of slot `slot`'s draws at `step` (record, noise, timestep, skip, frames)."""
    return torch.Generator("cpu").manual_seed(stream_seed(seed, slot, step, DRAW))


def seed_dropout(seed: int, slot: int, step: int) -> None:
    """Seed torch's global RNG (every device), which LoRA dropout draws from, for slot `slot` at `step`."""
    torch.manual_seed(stream_seed(seed, slot, step, DROPOUT))


def shard(groups: Sequence[Hashable], slot: int, slots: int) -> list[int]:
    """The record positions draw slot `slot` of `slots` samples among, given each record's group key.

    Records of one group stay together (the weighted variants of one image, original and mirrored:
    their sampling weights then hold within the shard); groups, in order of first appearance, go
    round-robin to the slots (group k to slot k mod slots). With fewer groups than slots, slot g
    takes group g mod (number of groups): several slots share it, with different draws. Shards
    differ in size when the slots do not divide the groups.
    """
    order = list(dict.fromkeys(groups))
    if not order:
        raise ValueError("no records to shard")
    chosen = {order[k % len(order)] for k in range(max(len(order), slots)) if k % slots == slot}
    return [position for position, key in enumerate(groups) if key in chosen]


def shard_group(position: int, weighted: bool, video_index: int) -> tuple[str, int]:
    """A record's group for `shard`: its source when it is a weighted variant, else the record itself."""
    return ("source", video_index) if weighted else ("record", position)


@dataclass(frozen=True)
class Ranks:
    """This process's rank in a world of `world_size` (1: no collectives at all)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collective tensors live

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place on a collective-device copy; returns it on the tensor's device."""
        if not self.distributed:
            return tensor
        moved = tensor.to(self.device)
        torch.distributed.all_reduce(moved)
        return moved.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce(torch.tensor([float(flag)])).item() > 0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def on_main(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 only; its result, or its exception, on every rank (the run folder's
        decisions: every rank must stop when rank 0 refuses OUT, instead of waiting in a collective)."""
        outcome: tuple[Any, BaseException | None] = (None, None)
        if self.is_main:
            try:
                outcome = (work(), None)
            except Exception as error:
                if not self.distributed:
                    raise
                outcome = (None, _portable(error))
        value, error = self.broadcast(outcome)
        if error is not None:
            raise error
        return value

    def broadcast_parameters(self, params: list[nn.Parameter]) -> None:
        """Overwrite every rank's `params` with rank 0's."""
        if not self.distributed:
            return
        with torch.no_grad():
            for param in params:
                moved = param.data.to(self.device)
                torch.distributed.broadcast(moved, src=0)
                param.data.copy_(moved.to(param.device))


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling (to send it to the other ranks), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"on rank 0: {type(error).__name__}: {error}")


def resolve_ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """Rank and world size from the arguments, else torch.distributed's when initialised, else 0 of 1."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if initialised:
        actual = torch.distributed.get_rank(), torch.distributed.get_world_size()
        given = (actual[0] if rank is None else rank, actual[1] if world_size is None else world_size)
        if given != actual:
            raise ValueError(f"rank {given[0]} of {given[1]} given, but torch.distributed says rank {actual[0]} "
                             f"of {actual[1]}")
        rank, world_size = actual
    else:
        rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
        if world_size > 1:
            raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group "
                             "(torchrun, Ray Train, or torch.distributed.init_process_group)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: need 0 <= rank < world_size")
    device = torch.device("cpu")
    if initialised and torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks(rank, world_size, device)
