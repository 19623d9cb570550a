"""What every rank agrees on at a step boundary, in one all-reduce.

Three things must be agreed each step: whether any rank was asked to drain, whether every rank's
background save has finished writing (so the commit can start), and, on logged steps, the loss
averaged over ranks. Each used to be a collective of its own; here they travel together, so a
step costs one collective beyond FSDP's own and, on a GPU, the host waits for the device only on
logged steps: a logged step reduces one device tensor and reads it with one `.tolist()`, any other
step reduces two flags on the CPU control group, which never waits for queued kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Boundary:
    drain: bool  # some rank was asked to drain: every rank saves and stops at this step
    saves_written: bool  # no rank is still writing a background save (or none is in flight)
    loss: float | None = None  # the global mean loss: logged steps only
    grad_norm: float | None = None  # rank 0's (replicated) gradient norm: logged steps only


def agree(
    *,
    drain: bool,
    writing: bool,
    loss_sum: torch.Tensor | None = None,
    loss_count: int = 1,
    grad_norm: torch.Tensor | None = None,
    control_group: dist.ProcessGroup | None = None,
) -> Boundary:
    """One all-reduce (SUM) of this rank's drain flag, whether it is still writing a save and,
    when ``loss_sum`` is given (a logged step), its loss sum and gradient norm.

    ``loss_count``: the losses summed on each rank (micro-batches); the mean is over all ranks.
    Without a loss the flags go over ``control_group`` (gloo, on the CPU), never the device.
    """
    flags = [float(drain), float(writing)]
    if loss_sum is None:
        vote = torch.tensor(flags)
        dist.all_reduce(vote, group=control_group)
        drained, still = vote.tolist()
        return Boundary(drain=drained > 0, saves_written=still == 0)
    # The norm is the same on every rank (clipping reduced it); only rank 0's is summed, so the
    # value read back is exactly that one and not world * norm / world rounded.
    norm = grad_norm if dist.get_rank() == 0 else torch.zeros_like(grad_norm)
    device = loss_sum.device
    packed = torch.cat(
        [
            loss_sum.detach().reshape(1).float(),
            norm.detach().reshape(1).float().to(device),
            torch.tensor(flags, device=device),
        ]
    )
    dist.all_reduce(packed)
    total, norm_value, drained, still = packed.tolist()  # the step's one host sync
    return Boundary(
        drain=drained > 0,
        saves_written=still == 0,
        loss=total / (loss_count * dist.get_world_size()),
        grad_norm=norm_value,
    )
