"""Process group, device mesh, FSDP2 sharding and the sharded model's build for the GPT recipe."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from recipes.gpt.model import ModelArgs, Transformer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str, timeout_s: int) -> torch.device:
    """Join the job's process group (gloo on CPU, NCCL on CUDA); a lone process forms its own."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return device


def build_mesh(device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: str,
    activation_checkpointing: bool,
    compile_blocks: bool,
) -> Transformer:
    """Shard every block and then the root; blocks first so each gathers its own params.

    Works on a model built on the meta device (nothing is allocated; see ``build_model``)."""
    model.checkpoint_blocks = activation_checkpointing
    if compile_blocks:
        for block in model.layers:
            block.compile()
    if param_dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build_model(
    args: ModelArgs,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    seed: int,
    param_dtype: str = "fp32",
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
) -> Transformer:
    """The sharded model with its initial weights, never holding the full model on a rank.

    Built on the meta device, sharded there, then each rank allocates only its shards
    (``to_empty``) and fills them. The weights are exactly those of ``Transformer(args)`` on
    ``device`` followed by ``init_weights(seed=seed)``, for any world size (``_normal_`` in
    model.py says how); the rope buffers, left uninitialised by ``to_empty``, are recomputed.
    """
    with torch.device("meta"):
        model = Transformer(args)
    model = parallelize(model, mesh, param_dtype, activation_checkpointing, compile_blocks)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model
