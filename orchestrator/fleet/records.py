"""What `fleet up` records about a process it started (a cluster, the S3 server): a dataclass
written as JSON under $SPILLWAY_HOME/fleet/<fleet>/, replaced whole so a reader never sees half."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


class JsonRecord:
    """Mixin for a dataclass kept in one JSON file."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(asdict(self), indent=1))  # type: ignore[call-overload]
        os.replace(tmp, path)

    @classmethod
    def load(cls: type[R], path: Path) -> R | None:
        """The record, or None when there is none (or it is not one of ours)."""
        try:
            fields: Any = json.loads(path.read_text())
            return cls(**fields)
        except (OSError, ValueError, TypeError):
            return None
