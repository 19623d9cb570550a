"""The GPT recipe: FSDP2 training that stops, saves, and resumes exactly on any world size.

    torchrun --nproc_per_node=2 -m recipes.gpt.train model=tiny data=synthetic \
        trainer.max_steps=200 checkpoint.every_steps=50 run_dir=/tmp/run

Writes metrics (one line per optimizer step) into RUN_DIR/metrics/ and committed checkpoints
under checkpoint.storage (RUN_DIR/checkpoints by default); RUN_DIR may be any fsspec URL. Run the
same command again, with any number of ranks, and it continues from the latest committed
checkpoint (or from exactly checkpoint.resume_step, as the controller asks).

An attempt the controller started carries checkpoint.epoch and checkpoint.fence_url; when the
fence names a newer epoch the attempt stops at its next save, committing and deleting nothing,
and exits with the fenced status.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from orchestrator.checkpoint.distributed import Checkpointer
from orchestrator.checkpoint.fence import Fenced
from orchestrator.checkpoint.rng import seed_rng
from orchestrator.config import ConfigError, compose_run, pick_device_type, validate
from orchestrator.rundir import RunDir
from orchestrator.tracking.progress import BarSafeHandler, Progress
from orchestrator.tracking.wandb_run import WandbRun, new_run_id
from recipes.common import boundary
from recipes.common.drain import DRAINED_EXIT, FENCED_EXIT, Drain, SigtermDrain
from recipes.gpt.data import BatchPlan, make_token_source, micro_batches
from recipes.gpt.model import ModelArgs, flops_per_token
from recipes.gpt.optim import build_optimizer, warmup_cosine
from recipes.gpt.parallel import build_mesh, build_model, init_distributed

log = logging.getLogger("spillway.gpt")

# Dense bf16 peak FLOP/s by device name, for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# Keys of the model config that decide the parameters' shapes.
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim")


def shape_hash(model_cfg: DictConfig) -> str:
    shape = {k: model_cfg[k] for k in SHAPE_KEYS}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def train_step(model, optimizer, batches, device, agree) -> boundary.Boundary:
    """One optimizer step over this rank's micro-batches. ``agree(loss_sum=)`` clips the
    gradients and makes the step boundary's one all-reduce (recipes.common.boundary) between
    the backward pass and the optimizer step; its answer is returned."""
    loss_sum = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(batches):
        # Reduce-scatter gradients once per optimizer step, on the last micro-batch.
        model.set_requires_gradient_sync(i == len(batches) - 1)
        logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten())
        (loss / len(batches)).backward()
        loss_sum += loss.detach()
    at = agree(loss_sum=loss_sum)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if at.drain and at.loss is None:  # the drained step is the attempt's last: record it
        dist.all_reduce(loss_sum)
        mean = loss_sum.item() / (len(batches) * dist.get_world_size())
        at = dataclasses.replace(at, loss=mean)
    return at


# What a resume reads of the trainer state, and the JSON type each must have.
STATE_TYPES = {"tokens_seen": int, "run_id": str, "shape_hash": str, "scheduler": dict}


@dataclass(frozen=True)
class TrainResult:
    step: int  # the last step trained (checkpointed, unless fenced)
    drained: bool  # stopped early on a drain request
    fenced: bool = False  # stopped at a save because a newer attempt exists; nothing committed


def train(cfg: DictConfig, drain: Drain | None = None) -> TrainResult:
    """Train to trainer.max_steps, stop_at_step, or a drain, whichever comes first."""
    drain = drain if drain is not None else SigtermDrain(cfg.run_dir)
    t, device_type = cfg.trainer, pick_device_type(cfg.trainer.device)
    device = init_distributed(device_type, t.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        handlers=[BarSafeHandler()],
    )
    # s3fs's client logs where it found its endpoint at INFO; that is not the run's news.
    for noisy in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plan = BatchPlan.for_world(t.global_batch_size, world, t.micro_batch_size)

    # Built on the meta device and initialised after sharding, so no rank ever holds the full
    # model; the weights are the same numbers for a seed on every world size (exact resume).
    args = ModelArgs(**OmegaConf.to_container(cfg.model))
    model = build_model(
        args,
        build_mesh(device_type),
        device,
        seed=t.seed,
        param_dtype=t.param_dtype,
        activation_checkpointing=t.activation_checkpointing,
        compile_blocks=t.compile,
    )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = warmup_cosine(optimizer, cfg.optim, t.max_steps)
    source = make_token_source(cfg.data)
    run_files = RunDir(cfg.run_dir)
    metrics = run_files.metrics_writer(cfg.logger.metrics_flush_s) if rank == 0 else None

    def committed(step: int, seconds: float) -> None:
        """On rank 0, once a checkpoint is committed: what the controller reads of it."""
        run_files.record_save(step, seconds)
        metrics.flush()

    step, tokens_seen, run_id = 0, 0, new_run_id()
    ckpt = tracker = progress = None
    drained = fenced = False
    try:
        ckpt = Checkpointer(
            cfg.checkpoint.storage,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
            verify_hashes=cfg.checkpoint.verify_hashes,
            timeout_s=t.collective_timeout_s,
            on_commit=committed if rank == 0 else None,
            epoch=cfg.checkpoint.epoch,
            fence_url=cfg.checkpoint.fence_url,
        )
        seed_rng(t.seed * 7919 + rank)
        resume_step = ckpt.resume_step(
            cfg.checkpoint.resume_step, verified=cfg.checkpoint.resume_verified
        )
        if resume_step is not None:
            state = ckpt.read_state(resume_step, expect=STATE_TYPES)
            if state["shape_hash"] != shape_hash(cfg.model):
                raise SystemExit(
                    f"spillway: checkpoint step {resume_step} in {cfg.checkpoint.storage} was "
                    f"saved from another model shape; use a new run_dir for model={cfg.model.name}"
                )
            if not ckpt.load(resume_step, model, optimizer):
                seed_rng(t.seed * 7919 + rank + 104729 * resume_step)
            step, tokens_seen, run_id = state["step"], state["tokens_seen"], state["run_id"]
            ckpt.check_like(resume_step, "scheduler", state["scheduler"], scheduler.state_dict())
            scheduler.load_state_dict(state["scheduler"])

        tracker = (
            WandbRun(cfg.logger, run_id, cfg.run_dir, OmegaConf.to_container(cfg))
            if (rank == 0 and cfg.logger.kind == "wandb")
            else None
        )
        progress = Progress(t.max_steps, step, t.log_every, enabled=rank == 0)
        progress.note(
            f"{'resumed from step ' + str(step) if resume_step is not None else 'started'}: "
            f"{world} rank(s) on {device_type}, {plan.per_rank} seq/rank in {plan.accum_steps} "
            f"micro-batch(es), run_dir {cfg.run_dir}"
        )
        flops_tok, peak = flops_per_token(args, cfg.data.seq_len), peak_flops(device)
        tokens_per_step = plan.global_batch * cfg.data.seq_len
        stop_at = t.stop_at_step if t.stop_at_step and t.stop_at_step > step else None

        def trainer_state(step: int, tokens_seen: int) -> dict:
            """Everything besides model and optimizer that an exact resume needs (JSON only:
            it may come back from a partner, and is read with json, never unpickled)."""
            return {
                "tokens_seen": tokens_seen,
                "data_position": step,
                "run_id": run_id,
                "scheduler": scheduler.state_dict(),
                "shape_hash": shape_hash(cfg.model),
                "config": OmegaConf.to_container(cfg),
            }

        # A metrics line (and the host sync that reads the loss) every log_every steps, and on
        # the steps the controller reads: an attempt's first, each save, and the last.
        first_step, window_began, window_steps = step + 1, time.perf_counter(), 0
        while step < t.max_steps:
            step += 1
            lr = scheduler.get_last_lr()[0]
            batches = micro_batches(source, step, plan, rank)
            saved = step % cfg.checkpoint.every_steps == 0 or step in (t.max_steps, stop_at)
            logged = saved or step == first_step or step % t.log_every == 0

            agree = functools.partial(
                boundary.clip_and_agree,
                model,
                cfg.optim.grad_clip,
                drain=drain.requested() is not None,
                writing=ckpt.writing(),
                loss_count=plan.accum_steps,
                logged=logged,
                control_group=ckpt.control_group,
            )
            at = train_step(model, optimizer, batches, device, agree)
            scheduler.step()
            tokens_seen += tokens_per_step
            window_steps += 1
            if at.loss is not None:
                now = time.perf_counter()
                elapsed = (now - window_began) / window_steps  # the mean step since the last
                window_began, window_steps = now, 0
                record = {
                    "step": step,
                    "loss": at.loss,
                    "lr": lr,
                    "grad_norm": at.grad_norm,
                    "world_size": world,
                    "tokens_seen": tokens_seen,
                    "step_time_s": elapsed,
                    "tokens_per_s": tokens_per_step / elapsed,
                    "time": time.time(),  # wall clock: when the controller saw a first step
                    # The last save's duration, so a lease is left early enough for a drain.
                    "checkpoint_s": ckpt.last_commit_s,
                }
                if peak:
                    record["mfu"] = flops_tok * tokens_per_step / elapsed / (peak * world)
                if metrics:
                    metrics.write(record)
                    if tracker:
                        tracker.log(record, step=step)
                progress.update(step, at.loss, lr, record["tokens_per_s"])

            # The save in flight (an earlier step's) commits once every rank has written it,
            # before this step's save starts: one save in flight at a time.
            ckpt.commit_if_written(at.saves_written)
            if saved or at.drain:
                ckpt.save(step, model, optimizer, trainer_state(step, tokens_seen))
            # Every rank agreed at this boundary, so one rank's SIGTERM drains them all.
            if at.drain:
                ckpt.wait()
                if rank == 0:
                    drain.acknowledge(step)
                progress.note(
                    f"drained after step {step} ({drain.requested() or 'another rank was asked'})"
                )
                drained = True
                break
            if step == stop_at:
                progress.note(
                    f"stopped after step {step} (trainer.stop_at_step); run again to resume"
                )
                break
        ckpt.close()
    except Fenced as exc:
        # Every rank got the same verdict from rank 0. Like a drain, without its save or its
        # acknowledgement: the checkpoints belong to the newer attempt now.
        fenced = True
        if rank == 0:
            log.warning("spillway: stopped after step %d, committing nothing: %s", step, exc)
        if ckpt is not None:
            ckpt.close()  # nothing left in flight: the refused commit took the pending save
    if progress:
        progress.close()
    if tracker:
        tracker.close()
    if metrics:
        metrics.close()
    dist.destroy_process_group()
    return TrainResult(step, drained, fenced)


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = compose_run(overrides)
        validate(cfg, world_size, device_type=pick_device_type(cfg.trainer.device))
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"spillway: bad config: {exc}", file=sys.stderr)
        sys.exit(2)
    result = train(cfg)
    sys.exit(FENCED_EXIT if result.fenced else DRAINED_EXIT if result.drained else 0)


if __name__ == "__main__":
    main()
