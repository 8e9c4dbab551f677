"""The few collective operations the objectives and diagnostics need.

Every function is the identity (or a local computation) when no process group is
initialised, so the same code runs in a single process, in tests and under DDP.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@contextmanager
def _autograd_collectives() -> Iterator[None]:
    """Quiet about ``torch.distributed.nn.functional``'s deprecation: its replacement is private, it still works."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*nn\.functional\.\w+ is deprecated", category=FutureWarning)
        yield


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's batch along dim 0, keeping the gradient of every slice.

    Plain ``dist.all_gather`` returns tensors detached from other ranks' graphs; the
    autograd-aware version sums the gradient of each slice back onto its owner, so a
    loss computed on the global batch gets the same gradient as in one process.
    All ranks must pass the same shape.
    """
    if not is_distributed() or world_size() == 1:
        return t
    with _autograd_collectives():
        return torch.cat(dist_nn.all_gather(t), dim=0)


def all_reduce_sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, keeping the gradient: ``t`` itself when alone.

    Backward sums every rank's gradient of the result onto each rank's ``t``, which is
    how a sum over the global batch differentiates: a loss of the global sum gets the
    single-process gradient once DDP averages it over ranks.
    """
    if not is_distributed() or world_size() == 1:
        return t
    with _autograd_collectives():
        return dist_nn.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, no gradient); ``t`` itself when alone."""
    if not is_distributed() or world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (no gradient)."""
    return all_reduce_sum(t) / world_size()


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order; ``[obj]`` when alone."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
