"""Token data whose global batch at step s depends only on the seed and s.

Every rank computes the same per-step draw (cheap: a start and stride, or an offset, per
sequence) and materialises only its own rows, so the same config feeds the same samples
on 1, 2 or 8 ranks and the only data position to keep is the step.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch splits into ranks and micro-batches."""

    global_batch: int
    world_size: int
    micro_batch: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accum_steps(self) -> int:
        return self.per_rank // self.micro_batch

    @classmethod
    def for_world(cls, global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide over {world_size} ranks")
        per_rank = global_batch // world_size
        # The largest micro-batch within the bound that divides the rank's share evenly.
        micro = max(m for m in range(1, min(max_micro_batch, per_rank) + 1) if per_rank % m == 0)
        return cls(global_batch, world_size, micro)

    def rank_rows(self, rank: int) -> range:
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)


def _step_generator(seed: int, step: int) -> torch.Generator:
    # A fixed odd multiplier keeps (seed, step) pairs from colliding for any realistic run.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class SyntheticTokens:
    """Arithmetic progressions modulo the vocab: learnable, so a falling loss means learning."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def rows(self, step: int, global_batch: int, rows: range) -> torch.Tensor:
        g = _step_generator(self.seed, step)
        starts = torch.randint(0, self.vocab_size, (global_batch,), generator=g)
        strides = torch.randint(1, 17, (global_batch,), generator=g)
        sel = torch.tensor(list(rows), dtype=torch.long)
        t = torch.arange(self.seq_len + 1)
        return (starts[sel, None] + strides[sel, None] * t) % self.vocab_size


class MemmapTokens:
    """Windows of a flat token file (nanoGPT .bin) at offsets drawn from (seed, step)."""

    def __init__(self, path: str, dtype: str, seq_len: int, seed: int) -> None:
        self.tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r")
        self.seq_len, self.seed = seq_len, seed
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than seq_len+2")

    def rows(self, step: int, global_batch: int, rows: range) -> torch.Tensor:
        g = _step_generator(self.seed, step)
        offsets = torch.randint(
            0, len(self.tokens) - self.seq_len - 1, (global_batch,), generator=g
        )
        windows = [
            self.tokens[o : o + self.seq_len + 1] for o in offsets[rows.start : rows.stop].tolist()
        ]
        return torch.from_numpy(np.stack(windows).astype(np.int64))


REPO_TEXT_SUFFIXES = (".md", ".py", ".yaml", ".toml")


def text_roots() -> list[Path]:
    """Spillway's own packages: the same files in a checkout, a wheel install, or the code an
    attempt's runtime_env brought to a cluster, so every cluster trains on the same corpus."""
    import orchestrator
    import recipes

    return [Path(orchestrator.__file__).resolve().parent, Path(recipes.__file__).resolve().parent]


def repo_text_files(roots: list[Path] | None = None) -> list[Path]:
    """Spillway's own code and configs, in an order that depends only on their package paths."""
    skip = {"__pycache__"}
    found = []
    for root in roots if roots is not None else text_roots():
        for p in root.rglob("*"):
            rel = p.relative_to(root.parent)
            if (
                p.suffix in REPO_TEXT_SUFFIXES
                and p.is_file()
                and p.stat().st_size  # an empty __init__.py adds nothing but a separator
                and not skip & set(rel.parts)
            ):
                found.append((rel.as_posix(), p))
    return [p for _, p in sorted(found)]


def repo_text_cache() -> str:
    """Where a cluster keeps the repo_text corpus when data.path is null: its own temp dir,
    since the path a run config was resolved with at launch may not exist there. Named by
    the corpus's digest, so another version of Spillway never reads a stale one."""
    digest = hashlib.sha256()
    for p in repo_text_files():
        digest.update(p.read_bytes())
    name = f"repo_text-{digest.hexdigest()[:12]}.bin"
    return os.path.join(tempfile.gettempdir(), "spillway-data", name)


def build_repo_text_bin(out_path: str, roots: list[Path] | None = None) -> int:
    """Write the byte-level corpus once; ranks racing here write identical bytes, renamed atomically."""
    out = Path(out_path)
    if out.exists():
        return out.stat().st_size // 2
    out.parent.mkdir(parents=True, exist_ok=True)
    text = b"\n\n".join(p.read_bytes() for p in repo_text_files(roots))
    tmp = out.with_name(f"{out.name}.{os.getpid()}.part")
    np.frombuffer(text, dtype=np.uint8).astype(np.uint16).tofile(tmp)
    os.replace(tmp, out)
    return len(text)


def make_token_source(data_cfg) -> SyntheticTokens | MemmapTokens:
    if data_cfg.kind == "synthetic":
        return SyntheticTokens(data_cfg.vocab_size, data_cfg.seq_len, data_cfg.seed)
    path = data_cfg.path
    if data_cfg.kind == "repo_text":
        path = path or repo_text_cache()
        build_repo_text_bin(path)
    return MemmapTokens(path, data_cfg.dtype, data_cfg.seq_len, data_cfg.seed)


def micro_batches(
    source, step: int, plan: BatchPlan, rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (inputs, targets) micro-batches for optimizer step `step`."""
    tokens = source.rows(step, plan.global_batch, plan.rank_rows(rank))
    chunks = tokens.split(plan.micro_batch)
    return [(c[:, :-1].contiguous(), c[:, 1:].contiguous()) for c in chunks]
