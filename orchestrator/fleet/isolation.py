"""What an isolated local cluster must not see, as a plan of mounts, and whether it can be isolated.

An isolated cluster's Ray processes run in a private mount namespace. Each hidden directory gets
an empty tmpfs over it; the cluster's own pieces that live inside a hidden directory (its Ray
temp dir, its token) are bound back on top. Both functions here are pure: the namespace module
(orchestrator.fleet.namespace) carries the plan out, and `fleet up` probes the machine.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Steps of a plan, in the order the namespace module runs them:
#   hold:  open the directory before anything covers it, to bind it back later
#   tmpfs: mount an empty tmpfs over the directory
#   bind:  bind a held directory back at its own path
#   seal:  remount a tmpfs read-only, so that a write into a hidden directory fails loudly
#          instead of filling memory


def mount_plan(hide: list[str], keep: list[str]) -> list[dict[str, str]]:
    """The steps that hide every path of `hide` and leave every path of `keep` visible.

    Paths must be absolute and already resolved (no symlinks). A hidden path inside another
    hidden one is covered already; a kept path that nothing hides needs no step. Paths are
    visited from the shallowest, so a path hidden inside a kept one is hidden after the kept one
    is bound back."""
    hides, keeps = _normal(hide, "hide"), _normal(keep, "keep")
    both = hides & keeps
    if both:
        raise ValueError(f"{sorted(map(str, both))[0]} is both hidden and kept")
    ops: list[tuple[str, str]] = []
    visited: dict[PurePosixPath, bool] = {}  # path -> hidden after its own step
    for path in sorted(hides | keeps, key=lambda p: (len(p.parts), str(p))):
        hidden_now = _hidden(path, visited)
        if path in hides:
            if not hidden_now:
                ops.append(("tmpfs", str(path)))
            visited[path] = True
        else:
            if hidden_now:
                ops.append(("bind", str(path)))
            visited[path] = False
    held = [("hold", p) for op, p in ops if op == "bind"]
    sealed = [("seal", p) for op, p in ops if op == "tmpfs"]
    return [{"op": op, "path": p} for op, p in held + ops + sealed]


def _normal(paths: list[str], what: str) -> set[PurePosixPath]:
    out = set()
    for p in paths:
        path = PurePosixPath(p)
        if not path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{what} path {p!r} must be absolute and resolved")
        if path == PurePosixPath("/"):
            raise ValueError(f"{what} path '/' would cover the whole machine")
        out.add(path)
    return out


def _hidden(path: PurePosixPath, visited: dict[PurePosixPath, bool]) -> bool:
    """Whether path is hidden by the deepest step already placed above it."""
    for parent in path.parents:  # nearest first
        if parent in visited:
            return visited[parent]
    return False


def isolation_decision(cluster: str, wanted: bool, refusal: str | None) -> tuple[bool, str | None]:
    """Whether to start `cluster` in its own mount namespace, and the one line to say if not.

    `refusal` is what the machine answered when asked for a mount namespace (None: it gave
    one)."""
    if not wanted:
        return False, None
    if refusal is None:
        return True, None
    return False, (
        f"cluster {cluster}: this machine refuses mount namespaces ({refusal}); "
        "starting it unisolated, so it sees this machine's files"
    )
