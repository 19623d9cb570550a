"""The run config: typed schema, composition of conf/, validation."""

from orchestrator.config.compose import compose_run, spillway_home
from orchestrator.config.errors import ConfigError
from orchestrator.config.validate import pick_device_type, validate

__all__ = ["ConfigError", "compose_run", "pick_device_type", "spillway_home", "validate"]
