"""Peak GPU memory of a model (default `8b`) trained by the recipe's parts on one GPU: built on
the meta device and initialised after sharding (recipes.gpt.parallel.build_model), FSDP2 with
the recipe's bf16/fp32-reduce mixed precision, activation checkpointing, the recipe's AdamW and
gradient clipping, a few steps of one fixed batch. Eager (no compile): memory, not speed.

    python bench/gpu_memory.py                        # 8b, 3 steps of 1 x 2048 tokens
    python bench/gpu_memory.py --out mem.json         # the figures as JSON as well
    python bench/gpu_memory.py --device cpu --model tiny --seq-len 32   # the logic, on a CPU

With one rank FSDP2 shards nothing, so the states are whole: fp32 parameters, gradients and
AdamW's two moments are 16 bytes a parameter (8b: 8.03e9 x 16 B = 120 GiB), before activations
and the optimizer's temporaries. Printed first, so a model that cannot fit says why. The
recipe's AdamW (torch's default implementation, foreach on CUDA) allocates temporaries the size
of a whole parameter group during its step; when that runs out of memory the script says in
which phase, then tries fused AdamW (no such temporaries) so the report shows both. It does not
run the recipe itself: the recipe's last-step save would write ~96 GB of 8b state to disk.

Exit status: 0 when some attempt fitted, 3 when none did (the report says where each ran out),
2 without a CUDA device (unless --device cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common  # bench/common.py (this directory is on sys.path; it puts the repo there too)

GIB = 2**30


def _mem(device: Any) -> dict[str, float | None]:
    import torch

    if device.type != "cuda":
        return {"allocated_gib": None, "peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }


def attempt(a: argparse.Namespace, device: Any, optimizer: str) -> dict[str, Any]:
    """Build, then train a few steps; the phases' memory, or the phase that ran out of it."""
    import torch

    from recipes.common.boundary import clip_and_agree
    from recipes.gpt.model import ModelArgs
    from recipes.gpt.optim import build_optimizer
    from recipes.gpt.parallel import build_mesh, build_model

    args = ModelArgs(**common.conf_yaml("model", a.model))
    optim_cfg = SimpleNamespace(**common.conf_yaml("optim", "adamw"))
    result: dict[str, Any] = {"optimizer": optimizer, "phases": {}, "step_time_s": []}
    phase = "build"
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model = build_model(
            args, build_mesh(device.type), device, seed=0, param_dtype=a.param_dtype,
            activation_checkpointing=True,
        )  # fmt: skip
        result["phases"]["build"] = _mem(device)
        opt = build_optimizer(model, optim_cfg)
        if optimizer == "fused":  # the same groups and hyperparameters: no group temporaries
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                      for g in opt.param_groups]  # fmt: skip
            opt = torch.optim.AdamW(
                groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                eps=optim_cfg.eps, fused=True,
            )  # fmt: skip
            assert all(g["fused"] for g in opt.param_groups)
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(0, args.vocab_size, (a.micro_batch, a.seq_len + 1), generator=g)
        batch = batch.to(device)
        for step in range(1, a.steps + 1):
            phase = f"step {step}"
            began = time.perf_counter()
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), batch[:, 1:].flatten()
            )
            del logits
            phase = f"step {step} backward"
            loss.backward()
            phase = f"step {step} optimizer"
            # The recipe's own clipping (and its one all-reduce), as a logged step does it.
            clip_and_agree(
                model, optim_cfg.grad_clip, drain=False, writing=False,
                loss_sum=loss.detach(), loss_count=1, logged=True,
            )  # fmt: skip
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result["step_time_s"].append(time.perf_counter() - began)
            result["phases"][f"after step {step}"] = _mem(device)
        result["fits"] = True
        result["loss"] = loss.item()
    except torch.OutOfMemoryError as exc:
        result["fits"] = False
        result["out_of_memory_in"] = phase
        result["error"] = str(exc).splitlines()[0][:300]
        result["phases"]["at the error"] = _mem(device)
    return result


def release(device: Any) -> None:
    """Give back what the last attempt held (its frame is gone), so the next starts empty."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


def report(a: argparse.Namespace, device: Any, attempts: list[dict[str, Any]]) -> list[str]:
    import torch

    from recipes.gpt.model import ModelArgs, num_params

    args = ModelArgs(**common.conf_yaml("model", a.model))
    with torch.device("meta"):
        from recipes.gpt.model import Transformer

        n = num_params(Transformer(args))
    lines = [
        f"gpu_memory: model={a.model} ({n / 1e9:.2f}e9 params) on 1 {device.type} rank, FSDP2, "
        f"param_dtype={a.param_dtype}, activation checkpointing, micro_batch={a.micro_batch} "
        f"seq_len={a.seq_len}, {a.steps} steps, "
        f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}",
        f"states alone (fp32 params + grads + 2 AdamW moments, 16 B/param): {n * 16 / GIB:.1f} GiB",
    ]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        lines.append(
            f"device: {torch.cuda.get_device_name(device)}, {total / GIB:.1f} GiB "
            f"({free / GIB:.1f} GiB free before the first attempt)"
        )
    for r in attempts:
        name = "recipe AdamW (foreach)" if r["optimizer"] == "recipe" else "fused AdamW"
        if r["fits"]:
            last = r["phases"][f"after step {a.steps}"]
            times = ", ".join(f"{t:.2f}" for t in r["step_time_s"])
            lines.append(
                f"{name}: fits. peak allocated {_fmt(last['peak_allocated_gib'])}, peak reserved "
                f"{_fmt(last['peak_reserved_gib'])}, after build "
                f"{_fmt(r['phases']['build']['allocated_gib'])}; step times {times} s"
            )
        else:
            at = r["phases"]["at the error"]
            lines.append(
                f"{name}: does NOT fit: out of memory in {r['out_of_memory_in']} (peak allocated "
                f"{_fmt(at['peak_allocated_gib'])}): {r['error']}"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="8b", help="a conf/model name")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--param-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", help="also write the figures here, as JSON")
    a = p.parse_args()

    # Before CUDA starts: fewer bytes lost to fragmentation between the phases' allocations.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import torch.distributed as dist

    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_memory: no CUDA device is available here (torch {torch.__version__}); "
            "run with --device cpu to check the logic only. Nothing was run.",
            file=sys.stderr,
        )
        sys.exit(2)
    from recipes.gpt.parallel import init_distributed

    device = init_distributed(a.device, 600)
    attempts = [attempt(a, device, "recipe")]
    release(device)
    if not attempts[0]["fits"]:
        attempts.append(attempt(a, device, "fused"))
        release(device)
    lines = report(a, device, attempts)
    print("\n".join(lines), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"lines": lines, "attempts": attempts}, indent=1))
    dist.destroy_process_group()
    sys.exit(0 if any(r["fits"] for r in attempts) else 3)


if __name__ == "__main__":
    common.run_main(main)
