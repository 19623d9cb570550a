"""Checks a composed run config cannot express in types: ranges, choices, and the batch maths."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from orchestrator.config.errors import ConfigError
from orchestrator.exit_codes import RESERVED as RESERVED_EXIT_CODES

# Models too large to train on a CPU in any useful time; refused there rather than left to OOM.
GPU_ONLY_MODELS = {"1b", "8b"}
RECOVERY_STRATEGIES = ("restart", "failover")


def pick_device_type(requested: str) -> str:
    """trainer.device as the device type a rank will use: auto takes CUDA where there is one."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"'{value}' is not allowed (allowed: {', '.join(allowed)})")


def _finite(key: str, value: float) -> None:
    # nan compares false with every bound, and inf passes every lower one.
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    _finite(key, value)
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


def _above(key: str, value: float, low: float) -> None:
    _finite(key, value)
    if value <= low:
        raise ConfigError(key, f"must be > {low}, got {value}")


def validate_sizes(cfg: DictConfig) -> None:
    """The numbers the world sizes are worked out from (admission's allowed_world_sizes):
    checked before that, so that a bad one is named rather than reported as no world size."""
    r = cfg.resources
    _at_least("trainer.global_batch_size", cfg.trainer.global_batch_size, 1)
    _at_least("resources.devices", r.devices, 1)
    if r.min_devices is not None and not 1 <= r.min_devices <= r.devices:
        raise ConfigError(
            "resources.min_devices", f"must be null or in 1..{r.devices}, got {r.min_devices}"
        )


def validate(cfg: DictConfig, world_size: int, device_type: str | None = None) -> None:
    """Raise ConfigError for the first thing wrong with cfg when run on world_size ranks."""
    t, d, m, o, c = cfg.trainer, cfg.data, cfg.model, cfg.optim, cfg.checkpoint
    _at_least("trainer.max_steps", t.max_steps, 1)
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        raise ConfigError(
            "trainer.stop_at_step", f"must be null or in 1..{t.max_steps}, got {t.stop_at_step}"
        )
    validate_sizes(cfg)
    _at_least("trainer.micro_batch_size", t.micro_batch_size, 1)
    _at_least("trainer.log_every", t.log_every, 1)
    _at_least("trainer.collective_timeout_s", t.collective_timeout_s, 1)
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.param_dtype", t.param_dtype, ("fp32", "bf16"))
    if world_size < 1:
        raise ConfigError("resources.devices", f"must be >= 1, got {world_size}")
    if t.global_batch_size % world_size:
        raise ConfigError(
            "trainer.global_batch_size",
            f"{t.global_batch_size} does not divide over {world_size} ranks "
            f"(allowed: a multiple of {world_size})",
        )

    _choice("data.kind", d.kind, ("synthetic", "memmap", "repo_text"))
    _choice("data.dtype", d.dtype, ("uint16", "uint32"))
    _at_least("data.seq_len", d.seq_len, 2)
    _at_least("data.vocab_size", d.vocab_size, 2)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if d.vocab_size > m.vocab_size:
        raise ConfigError(
            "data.vocab_size", f"{d.vocab_size} exceeds model.vocab_size={m.vocab_size}"
        )
    if d.dtype == "uint16" and d.vocab_size > 65536:
        raise ConfigError("data.dtype", "uint16 holds at most 65536 token ids (allowed: uint32)")
    if d.kind == "memmap" and d.path is None:
        raise ConfigError("data.path", "is required for data=memmap (a nanoGPT-style .bin file)")
    if d.kind == "memmap" and not Path(str(d.path)).is_file():
        raise ConfigError("data.path", f"no token file at {d.path} (allowed: an existing .bin)")

    for key in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "ffn_hidden_dim",
        "max_seq_len",
    ):
        _at_least(f"model.{key}", m[key], 1)
    if m.dim % m.n_heads or (m.dim // m.n_heads) % 2:
        raise ConfigError(
            "model.n_heads", f"dim {m.dim} must split into an even head size over {m.n_heads} heads"
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            "model.n_kv_heads", f"must divide model.n_heads={m.n_heads}, got {m.n_kv_heads}"
        )
    _finite("model.dropout", m.dropout)
    _above("model.norm_eps", m.norm_eps, 0.0)
    _above("model.rope_theta", m.rope_theta, 0.0)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if device_type == "cpu" and m.name in GPU_ONLY_MODELS:
        raise ConfigError("model", f"'{m.name}' needs a GPU (allowed on CPU: tiny, small)")

    _choice("optim.name", o.name, ("adamw",))
    _above("optim.lr", o.lr, 0.0)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    for key in ("beta1", "beta2"):
        _finite(f"optim.{key}", o[key])
        if not 0.0 <= o[key] < 1.0:
            raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {o[key]}")
    _above("optim.eps", o.eps, 0.0)
    _at_least("optim.weight_decay", o.weight_decay, 0.0)
    _finite("optim.min_lr_ratio", o.min_lr_ratio)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _at_least("optim.grad_clip", o.grad_clip, 0.0)

    _at_least("checkpoint.every_steps", c.every_steps, 1)
    _at_least("checkpoint.keep", c.keep, 2)
    _at_least("logger.metrics_flush_s", cfg.logger.metrics_flush_s, 0.0)
    if world_size > 1:
        # Each process has a memory:// store of its own: ranks would not see each other's files.
        for key, url in (("run_dir", cfg.run_dir), ("checkpoint.storage", c.storage)):
            if str(url).startswith("memory://"):
                raise ConfigError(
                    key,
                    f"{url} lives inside one process; with {world_size} ranks use a store they "
                    "share (a local path, s3://...) or resources.devices=1",
                )
    pl = cfg.placement
    _at_least("placement.lease_drain_margin_s", pl.lease_drain_margin_s, 0.0)
    _above("placement.drain_timeout_s", pl.drain_timeout_s, 0.0)
    _at_least("placement.spill_after_s", pl.spill_after_s, 0.0)
    _at_least("placement.min_lease_left_s", pl.min_lease_left_s, 0.0)
    if pl.budget is not None:
        _at_least("placement.budget", pl.budget, 0.0)
    _choice("placement.recovery", pl.recovery, RECOVERY_STRATEGIES)
    _at_least("placement.max_restarts", pl.max_restarts, 0)
    for code in pl.user_error_exit_codes:
        if not 1 <= code <= 255 or code in RESERVED_EXIT_CODES:
            reserved = ", ".join(f"{c} ({why})" for c, why in RESERVED_EXIT_CODES.items())
            raise ConfigError(
                "placement.user_error_exit_codes",
                f"{code} is not allowed: codes are 1..255 except {reserved}",
            )
    if pl.copy_limit_mb_s is not None and not (
        math.isfinite(pl.copy_limit_mb_s) and pl.copy_limit_mb_s > 0
    ):
        raise ConfigError(
            "placement.copy_limit_mb_s", f"must be > 0 or null, got {pl.copy_limit_mb_s}"
        )
    # The fleet (fleet.*) is checked by orchestrator.fleet.checks.validate_fleet, which the
    # CLI and the controller both run: a recipe on a rank has no use for it.
    _choice("logger.kind", cfg.logger.kind, ("none", "wandb"))
    _choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
