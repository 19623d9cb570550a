"""What both ends of the API agree on: the version prefix, the error body, and how the
controller is bootstrapped. No imports beyond the standard library, so either side may load it.

Every answer is JSON. An error is {"error": {"status": N, "message": "...", "key": "..."}}:
`message` is one line a person can read as it is, `key` (when given) names the config key or
request field at fault.
"""

from __future__ import annotations

PREFIX = "/v1"

# The controller's fleet config (JSON) reaches the bootstrap job through this variable.
FLEET_ENV = "SPILLWAY_FLEET"
# What the bootstrap job runs on the home head: it gets or creates the controller actor.
BOOTSTRAP_MODULE = "orchestrator.api.service"


def error_body(status: int, message: str, key: str | None = None) -> dict:
    error: dict = {"status": status, "message": message}
    if key is not None:
        error["key"] = key
    return {"error": error}
