"""Collectives for data-parallel training (Lightning's DDP strategy): every process plays its own games and
runs the same updates, so the weights, KL coefficients and reward statistics stay identical everywhere."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel


def is_distributed(trainer) -> bool:
    dist = torch.distributed
    return trainer is not None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def without_ddp_reducer(trainer):
    """Skip the DDP wrapper's gradient reducer: it expects one backward per forward over every parameter, while an
    iteration runs many backward passes that each touch one agent; :func:`average_gradients` averages instead."""
    model = trainer.strategy.model if trainer is not None else None
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over all processes with one all-reduce."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def any_true(flag: bool, device) -> bool:
    """Whether ``flag`` holds on any process (a MAX all-reduce; ``flag`` itself in one process)."""
    t = torch.tensor(float(flag), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
