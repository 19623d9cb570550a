"""AdamW, and warmup then cosine decay.

Clipping lives in recipes/common/boundary.py: its global norm rides the step's one all-reduce."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    # Norm weights and biases carry no weight decay, as in Llama and nanoGPT.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps
    )


def lr_factor(index: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """The LR multiplier for optimizer step index+1: linear warmup, then cosine to min_ratio."""
    if index < warmup_steps:
        return (index + 1) / warmup_steps
    progress = (index - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda i: lr_factor(i, optim_cfg.warmup_steps, max_steps, optim_cfg.min_lr_ratio),
    )

