"""One lane per cluster: the calls to that cluster run there, one after another, off the loop.

A cluster that hangs blocks its own lane and nothing else: the reconcile loop hands work to a
lane and goes on, and each tick reads whatever the lane has finished. A lane still busy with
an earlier call is not given the same kind of work again, so a hung cluster never collects a
pile of threads: it holds exactly one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

log = logging.getLogger("spillway.controller")


def storage_lane(cluster: str) -> str:
    """The lane for a cluster's storage: a store that answers while the cluster's API hangs
    (a partition of the head, not of the bucket) still takes fences and drain requests."""
    return f"{cluster}/storage"


def cleanup_lane(cluster: str) -> str:
    """The lane for deleting a cluster's old checkpoints: a prune of many files on a slow
    bucket never holds up a fence or a drain request on the storage lane."""
    return f"{cluster}/cleanup"


class Lanes:
    def __init__(self) -> None:
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pending: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()

    def _pool(self, cluster: str) -> ThreadPoolExecutor:
        if cluster not in self._pools:
            self._pools[cluster] = ThreadPoolExecutor(1, thread_name_prefix=f"lane-{cluster}")
        return self._pools[cluster]

    def busy(self, cluster: str, key: str) -> bool:
        """Whether work `key` given to this cluster's lane has not finished yet."""
        with self._lock:
            found = self._pending.get((cluster, key))
        return found is not None and not found.done()

    def wait(self, cluster: str, key: str, timeout_s: float) -> bool:
        """Wait up to timeout_s for work `key` on this cluster's lane to finish; True once it
        has, or when none is there."""
        with self._lock:
            found = self._pending.get((cluster, key))
        if found is None:
            return True
        try:
            found.exception(timeout=timeout_s)
        except TimeoutError:
            return False
        except CancelledError:
            pass
        return True

    def run(self, cluster: str, key: str, fn: Callable[[], object]) -> Future | None:
        """Queue fn on the cluster's lane unless work with the same key is still there;
        returns its future (None: not queued). fn's exception is logged with its traceback
        and kept in the future: one cluster's failure stays that cluster's."""
        with self._lock:
            found = self._pending.get((cluster, key))
            if found is not None and not found.done():
                return None

            def guarded() -> object:
                try:
                    return fn()
                except Exception:
                    log.exception("cluster %s: %s failed", cluster, key)
                    raise

            future = self._pool(cluster).submit(guarded)
            self._pending[(cluster, key)] = future
            return future

    def close(self) -> None:
        """Stop taking work; threads stuck in a hung call are left to end on their timeout."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
