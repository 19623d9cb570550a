"""What a cluster's Python must have installed before an attempt can run there.

The code travels with the attempt (the job's runtime_env); its dependencies do not, so the
driver checks them first and names exactly what is missing or which version it found. The
specifiers are pyproject.toml's own (a unit test keeps them equal): only the packages the
runtime imports, and wandb only for a run that logs to it.

Nothing here imports torch or ray: the check must run where they are missing.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

# What every rank imports: the recipe (torch, numpy), the driver (ray), the run config
# (omegaconf; hydra-core through orchestrator.config), the run files and checkpoints
# (fsspec; their hashes, blake3), progress (tqdm), and this check (packaging).
RUNTIME: tuple[str, ...] = (
    "torch>=2.11,<2.14",
    "ray[default]==2.60.*",
    "hydra-core==1.3.8",
    "omegaconf>=2.3,<2.4",
    "fsspec>=2024.6",
    "tqdm>=4.66",
    "numpy>=1.26",
    "packaging>=23",
    "blake3>=1.0",
)
WANDB = "wandb>=0.19"
S3FS = "s3fs>=2024.6"
# What only the controller and the embedded local fleet use, never a rank.
HOME_ONLY: tuple[str, ...] = ("moto[server]>=5.0", "aiohttp>=3.9")


def needed(run_config: Mapping[str, Any] | None = None) -> list[str]:
    """The requirements of one run: wandb only when its logger is wandb, s3fs only when its
    run dir or checkpoints are on s3://."""
    cfg = run_config or {}
    logger = cfg.get("logger") or {}
    urls = [str(cfg.get("run_dir", "")), str((cfg.get("checkpoint") or {}).get("storage", ""))]
    return [
        *RUNTIME,
        *([WANDB] if logger.get("kind") == "wandb" else []),
        *([S3FS] if any(u.startswith("s3://") for u in urls) else []),
    ]


def problems(installed: Mapping[str, str | None], requirements: Iterable[str]) -> list[str]:
    """One sentence per requirement that `installed` (distribution name -> version, None
    when absent) does not satisfy; empty when all are met."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion

    versions = {canonicalize_name(name): v for name, v in installed.items()}
    found = []
    for text in requirements:
        req = Requirement(text)
        version = versions.get(canonicalize_name(req.name))
        wanted = f"{req.name}{req.specifier}"
        if version is None:
            found.append(f"{req.name} is not installed (Spillway needs {wanted})")
            continue
        try:
            # A release candidate or a dev build of an allowed version is good enough.
            ok = req.specifier.contains(version, prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            found.append(f"{req.name} {version} is installed, Spillway needs {wanted}")
    return found


def installed_versions(requirements: Iterable[str]) -> dict[str, str | None]:
    """This Python's version of each required distribution, None for one not installed."""
    versions: dict[str, str | None] = {}
    for text in requirements:
        name = _name(text)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check(requirements: Iterable[str]) -> str | None:
    """What this Python lacks, as one line; None when every requirement is met."""
    wanted = list(requirements)
    try:
        import packaging.requirements  # noqa: F401  (ray and torch both bring it)
    except ImportError:
        return f"packaging is not installed: cannot check {', '.join(wanted)}"
    found = problems(installed_versions(wanted), wanted)
    return "; ".join(found) if found else None


def _name(requirement: str) -> str:
    """The distribution name of a requirement string, without packaging (it may be missing)."""
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            return requirement[:i]
    return requirement
