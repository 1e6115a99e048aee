"""Keeping the loss state identical across ranks: one all-reduce of a small buffer per step.

The row kernel reduces each rank's batch to a summary of ``5 + C`` (``5 + 3C`` class-conditional)
float64 numbers: valid count, the sums of CE, H and V, the invalid-target count, the class
histogram (and the per-class temperature sums). Summed over ranks, that summary is exactly the one
a single process would compute on the global batch, so every rank's finalize writes the same
``class_counts``, ``total_seen``, ``H*``, ``lambda`` and the same temperature gradient (that of the
global-batch loss), with no host synchronisation. The logits' gradient stays local (scaled by the
local batch), so DistributedDataParallel's gradient averaging gives the global-batch gradient
when the ranks hold equal batches.
"""
from __future__ import annotations

import warnings

from torch import Tensor

from .state import _caller_stacklevel


def _require_initialized() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized")


def check_member(process_group) -> None:
    """Before a step's collective (eager): torch.distributed is up and this rank is in the group,
    which torch's collectives would otherwise report as an unsupported group type."""
    import torch.distributed as dist

    _require_initialized()
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"this process (rank {dist.get_rank()}) is not a member of the "
                         f"process_group the loss was given: pass a group it belongs to, or none")


def all_reduce_summary(summary: Tensor, process_group) -> Tensor:
    """The sum over ranks of ``summary`` (a new tensor; the local one is kept for the loss)."""
    from torch.distributed import _functional_collectives as funcol

    _require_initialized()
    # The functional collective traces into torch.compile graphs and, like dist.all_reduce on a
    # copy, never blocks the host: the result is waited on where it is first used.
    # wait_tensor hands a plain tensor to the kernels (a Triton launcher reads its pointer).
    return funcol.wait_tensor(funcol.all_reduce(summary, "sum", process_group))


def warn_local_tau_gradient() -> None:
    """A ``reduction="none"`` loss with a process group: the temperature gradient is local."""
    warnings.warn("with reduction='none' and a process_group, tau's gradient is this rank's "
                  "alone (the per-element gradient the loss receives is local, so it cannot be "
                  "made that of the global batch): average tau.grad over the ranks "
                  "(dist.all_reduce(tau.grad, op=dist.ReduceOp.AVG)) before the optimizer step, "
                  "or tau drifts apart across ranks", stacklevel=_caller_stacklevel())
