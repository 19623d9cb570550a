"""Unit tests for recipes/gpt/model.py (CPU, fast)."""

from __future__ import annotations

import math
import os
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from recipes.gpt.model import (
    Attention,
    ModelArgs,
    Transformer,
    apply_rotary,
    flops_per_token,
    num_params,
    precompute_rope,
)
from recipes.gpt.parallel import build_mesh, build_model, parallelize
from tests.unit.single_rank import one_rank

CONF_DIR = Path(__file__).resolve().parents[2] / "orchestrator" / "conf" / "model"
TINY = ModelArgs(
    name="tiny",
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    ffn_hidden_dim=176,
    max_seq_len=256,
)


def _tokens(b: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (b, t), generator=g)


def _model(args: ModelArgs = TINY, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed=seed)
    return model


def _loss(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_output_shape() -> None:
    logits = _model()(_tokens(3, 10))
    assert logits.shape == (3, 10, TINY.vocab_size)
    assert logits.dtype == torch.float32


def test_rope_buffers_not_in_state_dict() -> None:
    sd = _model().state_dict()
    assert not any("rope" in k for k in sd)


def test_causality() -> None:
    model = _model().eval()
    tokens = _tokens(1, 12)
    changed = tokens.clone()
    t = 7
    changed[0, t] = (changed[0, t] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t], b[:, t])


def _reference_attention(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Textbook multi-head causal attention, one head at a time."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.wq(x).view(B, T, -1, hd).transpose(1, 2)
    k = attn.wk(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn.wv(x).view(B, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return attn.wo((probs @ v).transpose(1, 2).reshape(B, T, -1))


def test_gqa_equal_heads_is_mha() -> None:
    torch.manual_seed(0)
    args = replace(TINY, n_kv_heads=TINY.n_heads)
    attn = Attention(args)
    x = torch.randn(2, 9, args.dim)
    cos, sin = precompute_rope(args.head_dim, 9, args.rope_theta)
    torch.testing.assert_close(attn(x, cos, sin), _reference_attention(attn, x, cos, sin))


def test_gqa_matches_mha_with_duplicated_kv_heads() -> None:
    torch.manual_seed(0)
    args = replace(TINY, n_kv_heads=1)  # 4 query heads share one kv head
    gqa = Attention(args)
    mha = Attention(replace(args, n_kv_heads=args.n_heads))
    n_rep, hd = args.n_heads // args.n_kv_heads, args.head_dim
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(args.n_kv_heads, hd, args.dim)
            getattr(mha, name).weight.copy_(w.repeat_interleave(n_rep, 0).reshape(-1, args.dim))
    x = torch.randn(2, 9, args.dim)
    cos, sin = precompute_rope(hd, 9, args.rope_theta)
    out = gqa(x, cos, sin)
    assert out.shape == x.shape
    torch.testing.assert_close(out, mha(x, cos, sin))


def test_rope_scores_depend_only_on_relative_position() -> None:
    hd = 16
    cos, sin = precompute_rope(hd, 128, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary(q[None], cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k[None], cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    for offset in (0, 3, 17):
        ref = score(offset, 0)
        for base in (5, 40, 100):
            torch.testing.assert_close(score(base + offset, base), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(3, 0), score(10, 0))
    # Rotation preserves norms.
    torch.testing.assert_close(apply_rotary(q[None], cos[50:51], sin[50:51]).norm(), q.norm())


def test_init_weights_deterministic() -> None:
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_init_weights_stats() -> None:
    model = _model(replace(TINY, dim=256, ffn_hidden_dim=704))
    out_std = 0.02 / math.sqrt(2 * TINY.n_layers)
    block = model.layers[0]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(block.attention_norm.weight == 1)


def test_init_weights_preserves_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    model = Transformer(TINY)
    torch.manual_seed(123)
    model.init_weights(seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


def test_meta_build_matches_direct_build() -> None:
    direct = _model(seed=3)
    with torch.device("meta"):
        meta = Transformer(TINY)
    assert meta.tok_embeddings.weight.is_meta
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    for (name, pa), pb in zip(direct.named_parameters(), meta.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(direct.rope_cos, meta.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(direct.rope_sin, meta.rope_sin, rtol=0, atol=0)
    tokens = _tokens()
    torch.testing.assert_close(direct(tokens), meta(tokens))


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_8b_builds_and_shards_on_meta_without_allocating(tmp_path) -> None:
    args = ModelArgs(**yaml.safe_load((CONF_DIR / "8b.yaml").read_text()))
    before = _rss_bytes()
    with torch.device("meta"):
        model = Transformer(args)
    with one_rank(tmp_path):
        parallelize(model, build_mesh("cpu"), "bf16", True, False)
        tensors = [*model.parameters(), *model.buffers()]
        assert all(t.is_meta for t in tensors)
        assert all(p.to_local().is_meta for p in model.parameters())  # sharded, still meta
        # Llama-3-8B with an untied head: 8.03e9, by hand from the shapes.
        d, hd, L, V, ffn = 4096, 128, 32, 128256, 14336
        per_layer = 2 * d * d + 2 * d * 8 * hd + 3 * d * ffn + 2 * d
        assert num_params(model) == 2 * V * d + L * per_layer + d == 8_030_261_248
    # 32 GB in fp32 had it been allocated; a meta build costs only the module objects.
    assert _rss_bytes() - before < 256 * 2**20


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_meta_sharded_build_matches_eager_build_on_one_rank(tmp_path, param_dtype) -> None:
    """The recipe's build (meta, shard, to_empty, init) gives the eager model's exact numbers;
    2 and 3 ranks are in tests/integration/test_meta_init.py."""
    eager = _model(seed=4)
    with one_rank(tmp_path):
        sharded = build_model(TINY, build_mesh("cpu"), torch.device("cpu"), seed=4,
                              param_dtype=param_dtype)  # fmt: skip
        for (name, pa), pb in zip(eager.named_parameters(), sharded.parameters(), strict=True):
            torch.testing.assert_close(pb.full_tensor(), pa, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(sharded.rope_cos, eager.rope_cos, rtol=0, atol=0)
        torch.testing.assert_close(sharded.rope_sin, eager.rope_sin, rtol=0, atol=0)
        if param_dtype == "fp32":
            tokens = _tokens()
            torch.testing.assert_close(sharded(tokens), eager(tokens), rtol=0, atol=0)


def test_training_reduces_loss() -> None:
    model = _model()
    tokens = _tokens(4, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = _loss(model, tokens).item()
    assert first == pytest.approx(math.log(TINY.vocab_size), rel=0.05)  # near-uniform at init
    for _ in range(20):
        opt.zero_grad()
        loss = _loss(model, tokens)
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_checkpoint_blocks_same_loss_and_grads() -> None:
    tokens = _tokens(2, 17)
    plain, ckpt = _model(seed=5), _model(seed=5)
    ckpt.checkpoint_blocks = True
    la, lb = _loss(plain, tokens), _loss(ckpt, tokens)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_num_params_tiny_hand_count() -> None:
    d, L, hd, kv, V, ffn = 64, 2, 16, 2, 256, 176
    per_layer = d * d + 2 * d * kv * hd + d * d + 3 * d * ffn + 2 * d
    expected = V * d + L * per_layer + d + d * V
    assert expected == 125_248
    model = _model()
    assert num_params(model) == expected
    assert num_params(model, exclude_embedding=True) == expected - V * d


def test_flops_per_token() -> None:
    model = _model()
    n = num_params(model, exclude_embedding=True)
    t = 128
    assert flops_per_token(TINY, t) == 6 * n + 12 * TINY.n_layers * TINY.dim * t
    assert flops_per_token(TINY, 2 * t) > flops_per_token(TINY, t)
    # Llama-3-8B: ~8.03e9 params total, so non-embedding ~7.5e9 and 6N ~4.5e10.
    big = ModelArgs(**yaml.safe_load((CONF_DIR / "8b.yaml").read_text()))
    assert 4.4e10 < flops_per_token(big, 0) < 4.6e10


def test_sequence_longer_than_max_rejected() -> None:
    model = _model(replace(TINY, max_seq_len=8))
    with pytest.raises(ValueError):
        model(_tokens(1, 9))


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_load(path: Path) -> None:
    d = yaml.safe_load(path.read_text())
    assert set(d) == {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**d)  # args only: 1b/8b are far too big to build here
    assert args.name == path.stem
    assert isinstance(args.norm_eps, float) and isinstance(args.rope_theta, float)
    assert args.n_heads % args.n_kv_heads == 0
    assert args.dim % args.n_heads == 0


def test_expected_model_configs_present() -> None:
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} >= {"tiny", "small", "1b", "8b"}
