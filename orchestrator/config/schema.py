"""The typed run config: one dataclass per Hydra group, registered in Hydra's ConfigStore.

Each group's YAML under conf/ is merged onto these dataclasses, so a misspelt key or a value
of the wrong type is refused at composition, before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # tokens; repo_text: bytes of this repository's own text, built into a .bin on first use.
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
    log_every: int = 10
    collective_timeout_s: int = 600


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    keep: int = 2
    async_save: bool = False
    # An fsspec URL or a local path.
    storage: str = "${run_dir}/checkpoints"
    verify_hashes: bool = True


@dataclass
class LoggerConfig:
    kind: str = "none"
    project: str = "spillway"
    entity: str | None = None
    mode: str = "offline"


@dataclass
class ResourcesConfig:
    devices: int = 2
    device_type: str = "cpu"


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
}


def register() -> None:
    """Put the schema in Hydra's ConfigStore; conf/train.yaml names it first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
