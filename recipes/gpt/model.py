"""Llama-style decoder-only transformer used by the GPT recipe.

Kept deliberately plain (no fused kernels, no complex numbers) so the same module works
eagerly, under torch.compile, and after FSDP2 ``fully_shard`` turns parameters into DTensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    name: str = "tiny"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 256
    ffn_hidden_dim: int = 176
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Fail at config time rather than with a shape error deep inside attention.
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 mean-of-squares loses too much precision; normalise in fp32 and cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def precompute_rope(
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each [max_seq_len, head_dim] fp32, in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    pos = torch.arange(max_seq_len, device=device).float()
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim] by position; cos/sin are [T, head_dim].

    Real-valued rotate-half form: complex tensors are not supported by DTensor/FSDP2 and
    break some torch.compile paths. Rotation is done in fp32 to keep long positions exact.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.dropout = args.dropout
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head i reads kv head i // n_rep (Llama grouping). SDPA's enable_gqa is newer
        # than our torch floor, so expand explicitly.
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block; the unit that FSDP2 shards and activation checkpointing recomputes."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.resid_dropout(self.attention(self.attention_norm(x), cos, sin))
        return h + self.resid_dropout(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # Flipped by the parallelism code to recompute blocks in backward.
        self.checkpoint_blocks: bool = False
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Non-persistent: derivable from args, so keep them out of checkpoints. Note that
        # model.to(bf16) would also cast these; FSDP2 mixed precision leaves buffers alone.
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute rope buffers, e.g. after ``to_empty`` left them uninitialised."""
        device = self.rope_cos.device if device is None else device
        cos, sin = precompute_rope(
            self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device
        )
        self.rope_cos, self.rope_sin = cos, sin

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise all parameters and rope buffers in place.

        Safe after ``meta`` construction + ``to_empty``, and on FSDP2-sharded (DTensor) params:
        a sharded parameter gets exactly the values the unsharded model would have, whatever
        the world size (see ``_normal_``), holding one full parameter at a time on its device.
        With a seed, the result depends only on the seed and the device type, and the caller's
        global RNG state is left untouched.
        """
        self.reset_rope()
        # GPT-2/Llama scaling: each residual add contributes variance, so shrink the
        # projections that write into the residual stream.
        out_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        with _seeded(seed, _local(self.tok_embeddings.weight).device):
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    std = out_std if name.endswith(("wo", "w2")) else 0.02
                    _normal_(module.weight, std=std)
                elif isinstance(module, nn.Embedding):
                    _normal_(module.weight, std=0.02)
                elif isinstance(module, RMSNorm):
                    _local(module.weight).fill_(1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [B, T] -> logits [B, T, vocab_size]."""
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.tok_embeddings(tokens)
        for block in self.layers:
            if self.checkpoint_blocks:
                h = checkpoint(block, h, cos, sin, use_reentrant=False)
            else:
                h = block(h, cos, sin)
        return self.output(self.norm(h))


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view of FSDP2's storage)."""
    return param.to_local() if isinstance(param, DTensor) else param


def _normal_(param: torch.Tensor, std: float) -> None:
    """Fill param from N(0, std) with the numbers an unsharded init draws, on any sharding.

    The generator is a stream: a shard cannot skip to its own part of it (not on CPU, and the
    CUDA kernel's per-thread layout is not a contract), so every rank draws the whole parameter
    in the unsharded order, on the parameter's device, and keeps its own shard. Drawing one
    parameter at a time bounds the extra memory by the largest parameter (the 8b embedding:
    2.1 GB fp32), never the model, and needs no collective. DTensor's own sharded RNG gives
    numbers that match no unsharded init, which exact resume on another world size needs.
    """
    if not isinstance(param, DTensor):
        nn.init.normal_(param, mean=0.0, std=std)
        return
    local = param.to_local()
    full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
    full.normal_(mean=0.0, std=std)
    # src_data_rank=None: every rank slices its shard out of its own copy; nothing is sent.
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    local.copy_(shard.to_local())


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed only the generator that init will draw from, restoring it afterwards."""
    if seed is None or device.type not in ("cpu", "cuda"):
        yield
        return
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameter count (global, also for DTensor shards); optionally minus token embeddings."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        n -= model.tok_embeddings.weight.numel()
    return n


def _non_embedding_params(args: ModelArgs) -> int:
    # Computed from args so MFU can be reported for models too large to instantiate here.
    kv_dim = args.n_kv_heads * args.head_dim
    attn = 2 * args.dim * args.dim + 2 * args.dim * kv_dim
    ffn = 3 * args.dim * args.ffn_hidden_dim
    per_layer = attn + ffn + 2 * args.dim
    return args.n_layers * per_layer + args.dim + args.dim * args.vocab_size


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as used by torchtitan for MFU)."""
    return float(6 * _non_embedding_params(args) + 12 * args.n_layers * args.dim * seq_len)
