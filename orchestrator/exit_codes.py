"""Exit codes of an attempt's driver that mean something other than "the training failed".

A leaf module (no imports) so the config checks, the runtime, the recipes and the controller
all read the same numbers. Values follow sysexits.h where one fits.
"""

NO_CAPACITY = 3  # the placement group could not be reserved in time: queue again
RANK_LOST = 69  # EX_UNAVAILABLE: a rank's process died (killed, OOM, node gone): a fault
DRAINED = 75  # EX_TEMPFAIL: every rank stopped at one step with a committed checkpoint
# EX_CONFIG: the cluster's Python lacks a package Spillway needs, or has the wrong version of
# one: the cluster's fault, not the job's, so the job moves to another cluster.
BROKEN_ENVIRONMENT = 78

# What each reserved code means, for messages: a user-error code may not reuse one.
RESERVED: dict[int, str] = {
    NO_CAPACITY: "no capacity",
    RANK_LOST: "rank lost",
    DRAINED: "drained",
    BROKEN_ENVIRONMENT: "cluster environment",
}
