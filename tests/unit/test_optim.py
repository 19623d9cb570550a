"""Warmup then cosine decay, by optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from recipes.gpt.optim import build_optimizer, lr_factor, warmup_cosine


def test_warmup_rises_linearly_then_cosine_reaches_the_floor():
    factors = [lr_factor(i, warmup_steps=4, max_steps=104, min_ratio=0.1) for i in range(104)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_factor(500, 4, 104, 0.1) == pytest.approx(0.1)


def test_no_warmup_starts_at_full_lr():
    assert lr_factor(0, warmup_steps=0, max_steps=10, min_ratio=0.0) == 1.0


def test_scheduler_state_round_trips_to_the_same_lr():
    cfg = OmegaConf.create(
        dict(
            lr=1.0,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            warmup_steps=3,
            min_lr_ratio=0.1,
        )
    )
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, cfg)
    sched = warmup_cosine(opt, cfg, max_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    fresh_opt = build_optimizer(model, cfg)
    fresh = warmup_cosine(fresh_opt, cfg, max_steps=20)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.get_last_lr() == sched.get_last_lr()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
