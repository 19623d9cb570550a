"""The one error a bad run config raises: it names the key and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")
