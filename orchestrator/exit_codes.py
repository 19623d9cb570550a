"""Exit codes of an attempt's driver, and what each says about whose fault a failure was.

A leaf module (no imports) so the config checks, the runtime, the recipes and the controller
all read the same numbers. Values follow sysexits.h where one fits.

The taxonomy: a user error (USER_ERROR, BAD_CONFIG, or a code the job lists in
placement.user_error_exit_codes) fails the job at once, since another attempt would fail the
same way; infrastructure (INFRASTRUCTURE, RANK_LOST, BROKEN_ENVIRONMENT, a driver killed by a
signal) is retried from the last committed checkpoint; DRAINED and FENCED stopped on purpose
with nothing lost; a job Ray reports STOPPED was cancelled.
"""

USER_ERROR = 1  # an exception raised in the user's own code (the recipe, the model)
BAD_CONFIG = 2  # the run config is invalid: refused before anything trained
NO_CAPACITY = 3  # the placement group could not be reserved in time: queue again
RANK_LOST = 69  # EX_UNAVAILABLE: a rank's process died (killed, OOM, node gone): a fault
# EX_IOERR: the infrastructure failed under a healthy program: storage, a collective that
# timed out or lost its peer, the network.
INFRASTRUCTURE = 74
DRAINED = 75  # EX_TEMPFAIL: every rank stopped at one step with a committed checkpoint
# EX_PROTOCOL: a newer attempt of the job exists (the fence in its storage says so), so this
# one stopped before committing anything: it lost a partition, not a step.
FENCED = 76
# EX_CONFIG: the cluster's Python lacks a package Spillway needs, or has the wrong version of
# one: the cluster's fault, not the job's, so the job moves to another cluster.
BROKEN_ENVIRONMENT = 78

# What each reserved code means, for messages: a user-error code may not reuse one.
RESERVED: dict[int, str] = {
    NO_CAPACITY: "no capacity",
    RANK_LOST: "rank lost",
    INFRASTRUCTURE: "infrastructure",
    DRAINED: "drained",
    FENCED: "fenced by a newer attempt",
    BROKEN_ENVIRONMENT: "cluster environment",
}
