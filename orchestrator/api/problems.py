"""Why the API turns a request down, as exceptions the server maps to an HTTP status."""

from __future__ import annotations


class ApiProblem(Exception):
    status = 500

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


class BadRequest(ApiProblem):
    """The body is not what the route takes, or the run config does not fit the schema."""

    status = 400


class NotFound(ApiProblem):
    status = 404


class Conflict(ApiProblem):
    """The job's state refuses the request (migrate a job that does not run, ...)."""

    status = 409


class Busy(ApiProblem):
    """The reconcile loop held the controller's lock too long; nothing was done."""

    status = 503


class Upstream(ApiProblem):
    """A cluster behind the controller did not answer (its Jobs API, its store)."""

    status = 502
