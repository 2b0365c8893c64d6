"""Several processes through ``torch.distributed`` (``torchrun``): the rank and world, which shards of the
calibration set each rank runs, and the ordered combination of per-shard statistics.

A run with ``WORLD_SIZE > 1`` in its environment (``torchrun --nproc-per-node N``) joins a process group:
gloo on the CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``); the code path is the same.

**Shards.** The calibration set is cut into canonical shards: consecutive chunks of ``step`` sequences, the
chunking every forward pass uses (:func:`turboboa.models.chunks.chunk_size` of the whole set). Rank ``r`` of
``N`` runs the contiguous shards ``[r k, (r + 1) k)`` with ``k = ceil(shards / N)`` (the last ranks may get
fewer, or none). A shard's forward pass and statistic sums are the same whichever rank runs it.

**Order.** A statistic is the left fold of its shard sums in shard order, ``((s_0 + s_1) + s_2) + ...``,
divided once by the total count. The single process folds each shard sum as soon as it is computed; ``N``
ranks all-gather their shard sums (never ``all_reduce``, whose summation order is not fixed) and every rank
folds them in the same order. Both therefore hold the same bytes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


class Mergeable(Protocol):
    """A statistic summed over shards: ``merge(other)`` folds ``other``'s sums into this one's."""

    def merge(self, other: Any) -> None: ...


M = TypeVar("M", bound=Mergeable)


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0 (``RANK`` as torchrun sets it; a single process is): the one that
    reports errors and progress."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA ``device`` under torchrun, else ``device``."""
    if device.type == "cuda" and world_size_from_env() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run: ``rank`` of ``size`` (a single process: 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the QDIR and the resume state, and reports errors."""
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device) -> World:
        """The world of this process: with ``WORLD_SIZE > 1`` join (once) the default process group, gloo for
        a CPU ``device``, NCCL for CUDA (``device`` is this rank's, :func:`rank_device`); a single process
        otherwise."""
        size = world_size_from_env()
        if size <= 1:
            return cls()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend)
            except (ValueError, RuntimeError) as e:
                raise UserError(f"cannot join the {size} ranks of this run ({' '.join(str(e).split())[:200]}); "
                                f"start it with torchrun") from None
        return cls(dist.get_rank(), dist.get_world_size())

    # -- the shards of this rank ------------------------------------------------------------------------------
    def shard_span(self, n_shards: int) -> range:
        """The shards this rank runs: the contiguous ``[r k, (r + 1) k)`` with ``k = ceil(n_shards / size)``."""
        k = -(-n_shards // self.size)
        return range(min(self.rank * k, n_shards), min((self.rank + 1) * k, n_shards))

    def sequence_span(self, n: int, step: int) -> slice:
        """The calibration sequences of this rank's shards (shards of ``step`` of the ``n`` sequences)."""
        shards = self.shard_span(-(-n // step))
        return slice(min(shards.start * step, n), min(shards.stop * step, n))

    # -- combining -----------------------------------------------------------------------------------------
    def all_gather(self, local: list[T]) -> list[T]:
        """Every rank's ``local`` items, concatenated in rank order (tensors travel through the CPU)."""
        if not self.distributed:
            return list(local)
        parts: list[list[T] | None] = [None] * self.size
        dist.all_gather_object(parts, _to_cpu(local))
        return [item for part in parts for item in (part or [])]

    def fold_shards(self, local: Sequence[M], into: M, device: torch.device) -> M:
        """``into`` with every rank's shard statistics ``local`` (this rank's shards, in shard order) folded in
        shard order: the all-gathered shards of rank 0, then rank 1, ... (``into.merge`` each, on ``device``)."""
        if not self.distributed:
            for shard in local:
                into.merge(shard)
            return into
        for shard in self.all_gather(list(local)):
            into.merge(to_device(shard, device))
        return into

    def broadcast(self, value: T, src: int = 0) -> T:
        """``value`` of rank ``src`` on every rank."""
        if not self.distributed:
            return value
        box = [_to_cpu(value) if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def together(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, which all learn whether it failed anywhere: a UserError on any rank is raised
        on every rank (the first failing rank's message; as a :class:`RankError` on all ranks but 0)."""
        error: UserError | None = None
        result = None
        try:
            result = fn()
        except UserError as e:
            if not self.distributed:
                raise
            error = e
        failures = [f for f in self.all_gather([None if error is None else str(error)]) if f is not None]
        if error is not None and self.is_main:
            raise error
        if failures:
            raise (UserError if self.is_main else RankError)(failures[0])
        return result  # type: ignore[return-value]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only (a write), the others waiting for it; every rank then learns how it ended. A
        failure on rank 0 is raised there as it is and on the other ranks as a :class:`RankError` (a UserError
        on rank 0) or a RuntimeError, so every rank exits with the same status and only rank 0 says why."""
        if not self.is_main:
            failure = self.broadcast(None)
            if failure is None:
                return None
            kind, message = failure
            raise RankError(message) if kind == "user" else RuntimeError(f"rank 0 failed: {message}")
        try:
            result = fn()
        except UserError as e:
            self.broadcast(("user", str(e)))
            raise
        except BaseException as e:
            self.broadcast(("other", f"{type(e).__name__}: {e}"))
            raise
        self.broadcast(None)
        return result

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class RankError(UserError):
    """Rank 0's UserError, seen by another rank: the run fails there too, and only rank 0 says why."""


def _to_cpu(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach().cpu())


def to_device(obj: Any, device: torch.device) -> Any:
    """A copy of ``obj`` with every tensor in it on ``device``."""
    return _map_tensors(obj, lambda t: t.to(device))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor in it (in lists, tuples, dicts and object attributes) mapped through ``fn``;
    objects are shallow-copied, never changed."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list):
        return [_map_tensors(x, fn) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        out = copy.copy(obj)
        for k, v in vars(obj).items():
            object.__setattr__(out, k, _map_tensors(v, fn))  # frozen dataclasses too
        return out
    return obj
