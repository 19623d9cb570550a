"""The host buffers an async save stages into: an exact copy, kept from one save to the next."""

from __future__ import annotations

import torch

from orchestrator.checkpoint.staging import StagingBuffers


def state(scale: float) -> dict:
    return {
        "model": {"w": torch.full((3, 4), scale), "b": torch.arange(4.0) * scale},
        "optim": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(2) * scale}},
                  "param_groups": [{"lr": 0.1, "params": [0]}]},
    }  # fmt: skip


def test_staged_is_a_copy_that_training_cannot_change():
    source = state(1.0)
    staged = StagingBuffers().stage(source)
    source["model"]["w"].add_(5.0)  # the next optimizer step
    assert torch.equal(staged["model"]["w"], torch.full((3, 4), 1.0))
    assert staged["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert staged["model"]["w"].data_ptr() != source["model"]["w"].data_ptr()


def test_buffers_are_reused_while_the_structure_stays_and_rebuilt_when_it_changes():
    buffers = StagingBuffers()
    first = buffers.stage(state(1.0))
    ptr = first["model"]["w"].data_ptr()
    second = buffers.stage(state(2.0))
    assert second["model"]["w"].data_ptr() == ptr  # the same host memory, refilled
    assert torch.equal(second["optim"]["state"][0]["exp_avg"], torch.full((2,), 2.0))
    grown = state(3.0)
    grown["optim"]["state"][1] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(5)}
    third = buffers.stage(grown)
    assert torch.equal(third["optim"]["state"][1]["exp_avg"], torch.zeros(5))
    assert torch.equal(third["model"]["w"], torch.full((3, 4), 3.0))
