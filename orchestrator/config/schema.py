"""The typed run config: one dataclass per Hydra group, registered in Hydra's ConfigStore.

Each group's YAML under conf/ is merged onto these dataclasses, so a misspelt key or a value
of the wrong type is refused at composition, before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RecipeConfig:
    name: str = "gpt"
    # The module torchrun starts on every rank.
    module: str = "recipes.gpt.train"


@dataclass
class ModelConfig:
    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int = MISSING
    vocab_size: int = MISSING
    ffn_hidden_dim: int = MISSING
    max_seq_len: int = MISSING
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0


@dataclass
class DataConfig:
    name: str = "synthetic"
    # synthetic: a learnable token stream made from the seed; memmap: a nanoGPT-style .bin of
    # tokens; repo_text: bytes of Spillway's own code and configs, built into a .bin on first use.
    kind: str = "synthetic"
    path: str | None = None
    dtype: str = "uint16"
    vocab_size: int = 256
    seq_len: int = 64
    seed: int = 1234


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    # The cosine decay ends at lr * min_lr_ratio on trainer.max_steps.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 300
    stop_at_step: int | None = None
    # Sequences per optimizer step, whatever the world size.
    global_batch_size: int = 16
    # Upper bound on sequences per forward pass on one rank; accumulation makes up the rest.
    micro_batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    param_dtype: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 1
    collective_timeout_s: int = 600


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    keep: int = 2
    async_save: bool = False
    # An fsspec URL or a local path.
    storage: str = "${run_dir}/checkpoints"
    verify_hashes: bool = True
    # Which committed step to resume from: null means the newest in storage (a run by hand);
    # the controller names the one it chose and verified, 0 meaning from scratch.
    resume_step: int | None = None
    # Set by the controller when it has just copied resume_step here and checked every byte
    # against the manifest as it landed: the attempt then checks sizes only, not every hash a
    # second time (at 8B scale a full re-hash of about 100 GB before the first step).
    resume_verified: bool = False
    # Fencing, set by the controller for each attempt: this attempt's epoch, and the URL of
    # the job's fence file on the cluster's storage. Before each commit and each prune rank 0
    # reads the fence; a newer epoch there means a newer attempt exists, and this one drains
    # itself committing nothing (exit_codes.FENCED). Null (a run by hand): no fence.
    epoch: int | None = None
    fence_url: str | None = None


@dataclass
class LoggerConfig:
    kind: str = "none"
    project: str = "spillway"
    entity: str | None = None
    mode: str = "offline"
    # Rank 0 puts its metrics into the run dir at least this often (and at every checkpoint).
    metrics_flush_s: float = 2.0


@dataclass
class ResourcesConfig:
    devices: int = 2
    # With min_devices the job takes any world size from min_devices to devices that divides
    # the global batch, whichever a cluster can give it now; null means exactly `devices`.
    min_devices: int | None = None
    device_type: str = "cpu"


@dataclass
class ClusterConfig:
    kind: str = "owned"  # owned | leased
    # Started on this machine by `spillway fleet up` (ports, token and temp dir chosen there).
    local: bool = False
    address: str | None = None  # Ray GCS address host:port, for a cluster started elsewhere
    dashboard_url: str | None = None
    token_path: str | None = None  # a file holding the cluster's Ray auth token
    token_env: str | None = None  # or an environment variable holding it
    device_type: str = "cpu"
    devices: int = 1
    # The Ray resource one rank asks for: GPU on a GPU cluster, a custom one on a CPU fleet.
    device_resource: str = "spillway_device"
    storage_root: str = MISSING
    # fsspec options for storage_root that are not secret, e.g. {endpoint_url: ...} for S3.
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Secret fsspec options (e.g. {"key": ..., "secret": ...}) as a JSON object, read from a
    # file or an environment variable when the store is opened: never part of a run config.
    storage_credentials_file: str | None = None
    storage_credentials_env: str | None = None
    cost_per_device_hour: float = 0.0
    # Lease window: ISO-8601 times, or offsets from `fleet up` such as +0s, +30m, +2h.
    lease_start: str | None = None
    lease_end: str | None = None
    num_cpus: int | None = None  # local clusters: CPUs the raylets advertise, all nodes together
    # Local clusters: a head plus nodes - 1 worker raylets, devices and CPUs split evenly.
    nodes: int = 1
    # Local clusters: run in a private mount namespace that hides the controller's state dir,
    # the other clusters' storage roots and Spillway's sources, as on another machine.
    isolated: bool = False
    # Local clusters: storage_root (s3://BUCKET/...) is served by the fleet's own S3 server,
    # which `fleet up` starts; its endpoint and keys reach the cluster's processes.
    local_s3: bool = False


@dataclass
class ControllerConfig:
    """Where the controller's HTTP API listens and how clients reach it."""

    # What clients connect to; null means http://host:port (the local fleet records its own).
    url: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None  # null: the local fleet picks a free port at `fleet up`
    token_path: str | None = None  # a file holding the API's bearer token
    token_env: str | None = None  # or an environment variable holding it
    # Send the token over plain http to a host that is not loopback (refused otherwise).
    insecure_http: bool = False


@dataclass
class FleetConfig:
    name: str = "local"
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # In order of preference: home first.
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    # A cluster whose dashboard has not answered for this long is lost: its jobs recover elsewhere.
    lost_after_s: float = 10.0
    # One that refuses connections (nothing listens: its head is gone) is lost sooner.
    refused_lost_after_s: float = 5.0
    # An attempt not confirmed by its cluster (submitted, or pending there) by then is lost.
    submit_deadline_s: float = 300.0
    # A checkpoint copy still running after this long is given up (the job recovers).
    copy_deadline_s: float = 3600.0
    # Events of finished jobs are kept this long.
    events_retention_s: float = 30 * 86400.0


@dataclass
class PlacementConfig:
    # Clusters the job accepts, in order of preference; empty means the whole fleet in order.
    clusters: list[str] = field(default_factory=list)
    # Device types the job accepts, in order of preference; empty means any.
    device_types: list[str] = field(default_factory=list)
    priority: int = 0
    budget: float | None = None  # most the whole job may cost; null means no limit
    spill_after_s: float = 0.0
    min_lease_left_s: float = 300.0
    # Drain a job on a lease this long before the lease ends: time for its save and a margin.
    lease_drain_margin_s: float = 60.0
    # A drained job that has not acknowledged by then is stopped and resumes from its last
    # committed checkpoint, as after a fault.
    drain_timeout_s: float = 300.0
    # After a fault: "restart" on the same cluster, or "failover" to the next in fleet order.
    recovery: str = "failover"
    max_restarts: int = 3  # recoveries after faults; one more fault fails the job
    # Exit codes that mean the job itself is wrong (1: an exception in the recipe, 2: a bad
    # config): it fails at once, since another attempt would fail the same way.
    user_error_exit_codes: list[int] = field(default_factory=lambda: [1, 2])
    # Move a job running on a lease to an owned cluster as soon as one has room.
    return_home: bool = False
    # Cap on the checkpoint copy rate when the job migrates, in MB/s; null means no cap.
    copy_limit_mb_s: float | None = None


@dataclass
class RunConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    state_dir: str = "${spillway_home:}"
    run_name: str = "${recipe.name}-${model.name}-${data.name}"
    run_dir: str = "${state_dir}/runs/${run_name}"


GROUPS: dict[str, type] = {
    "recipe": RecipeConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
    "logger": LoggerConfig,
    "resources": ResourcesConfig,
    "fleet": FleetConfig,
    "placement": PlacementConfig,
}


def register() -> None:
    """Put the schema in Hydra's ConfigStore; conf/train.yaml names it first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
