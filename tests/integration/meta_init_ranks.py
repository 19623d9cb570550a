"""One rank of tests/integration/test_meta_init.py, under torchrun on CPU (gloo).

Builds the tiny model two ways, the recipe's (meta, fully_shard, to_empty, init_weights) and the
old one (the full model on every rank, initialised, then sharded), and checks on every rank
that both hold the same local shards, bit for bit, and that the gathered parameters equal the
unsharded reference the test wrote (ARGV: reference file, seed). Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from recipes.gpt.model import ModelArgs, Transformer
from recipes.gpt.parallel import build_mesh, build_model, init_distributed, parallelize


def main(reference: str, seed: int) -> None:
    device = init_distributed("cpu", 60)
    args = ModelArgs()  # the tiny shape
    eager = Transformer(args)
    eager.init_weights(seed=seed)
    eager = parallelize(eager, build_mesh("cpu"), "fp32", False, False)
    meta = build_model(args, build_mesh("cpu"), device, seed=seed)
    expected = torch.load(reference, weights_only=True)
    names = [name for name, _ in meta.named_parameters()]
    assert names == list(expected), (names, list(expected))
    for (name, pm), pe in zip(meta.named_parameters(), eager.parameters(), strict=True):
        assert pm.placements == pe.placements, name
        assert torch.equal(pm.to_local(), pe.to_local()), f"{name}: local shard differs"
        assert torch.equal(pm.full_tensor(), expected[name]), f"{name}: differs from unsharded"
    for buf in ("rope_cos", "rope_sin"):
        assert torch.equal(getattr(meta, buf), getattr(eager, buf)), buf
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(meta(tokens), eager(tokens)), "forward differs"
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"meta init matches on {dist.get_world_size()} rank(s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
