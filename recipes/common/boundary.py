"""What every rank agrees on at a step boundary, in one all-reduce with the gradient norm.

Each step needs, besides FSDP's own collectives: the global gradient norm (for clipping), and
from every rank whether it was asked to drain and whether it is still writing a background save
(so the commit can start), and on logged steps the loss averaged over ranks. Each used to be a
collective of its own. Here they travel in one: after the backward pass, every rank all-reduces
its gradients' local sum of squares (FSDP2 shards every parameter, so each element is on exactly
one rank) together with its loss sum and its two flags, then clips and steps.

On a GPU the host waits for the device only on logged steps: a logged step reads that one tensor
with one `.tolist()`; on any other step the device reduces the norm alone (no host read) and the
two flags go over the CPU control group (gloo), which never waits for queued kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Boundary:
    drain: bool  # some rank was asked to drain: every rank saves and stops at this step
    saves_written: bool  # no rank is still writing a background save (or none is in flight)
    loss: float | None = None  # the global mean loss: logged steps only
    grad_norm: float | None = None  # the global gradient norm before clipping: logged only


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def clip_and_agree(
    model: torch.nn.Module,
    max_norm: float,
    *,
    drain: bool,
    writing: bool,
    loss_sum: torch.Tensor,
    loss_count: int,
    logged: bool,
    control_group: dist.ProcessGroup | None = None,
) -> Boundary:
    """Clip the gradients to ``max_norm`` (<= 0: no clipping) by their global norm, agreeing on
    the flags (and, when ``logged``, the loss) in the same all-reduce. ``loss_count``: losses
    summed on each rank (its micro-batches); the mean is over every rank's."""
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    device = loss_sum.device
    # fp32 sums of squares whatever the gradients' dtype; every rank sums its own shards.
    squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    flags = torch.tensor([float(drain), float(writing)])
    if logged:
        loss = loss_sum.detach().reshape(1).float()
        packed = torch.cat([squares.reshape(1), loss, flags.to(device)])
    else:
        packed = squares.reshape(1)
    dist.all_reduce(packed)
    norm = packed[0].sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # what clip_grad_norm_ applies
        torch._foreach_mul_(grads, scale)
    if logged:
        squares_sum, total, drained, still = packed.tolist()  # the step's one host sync
        return Boundary(
            drain=drained > 0,
            saves_written=still == 0,
            loss=total / (loss_count * dist.get_world_size()),
            grad_norm=math.sqrt(squares_sum),
        )
    dist.all_reduce(flags, group=control_group)
    drained, still = flags.tolist()
    return Boundary(drain=drained > 0, saves_written=still == 0)
