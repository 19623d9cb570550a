"""Bad input, generated: broken fleet files and broken run overrides, each refused by
`spillway launch` (run in this process through orchestrator.cli.main) with exit 2 and one line
naming the key, before it reaches the controller. A real controller with its real HTTP API
listens in this process the whole time, and the CLI's home holds a client.json naming it: a
launch that slipped through would be recorded there, which the control test below shows."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.config.compose import CONFIG_DIR_ENV, options
from orchestrator.config.schema import GROUPS as SCHEMA_GROUPS
from orchestrator.config.schema import ClusterConfig, FleetConfig, RunConfig
from orchestrator.fleet.checks import (
    DURATIONS,
    RESERVED_CLUSTER_NAMES,
    typed_fleet,
    validate_fleet,
)
from tests.api_controller import Running, start

TINY = ["data=synthetic", "data.seq_len=32", "trainer.max_steps=20"]
PREFIX = "spillway: bad config: "
# Each case of each table gets its own few examples, so every kind of breakage is tried on
# every run (about 95 overrides and 80 fleet files in all). No shrinking: a case that slipped
# through costs a launch, and its first example already says which case it was.
SETTINGS = dict(
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- the controller, the CLI's home, and what must not change -----------------------------


@dataclass
class Setting:
    running: Running
    home: Path  # the CLI's SPILLWAY_HOME: client.json naming the controller, and its token
    conf: Path  # the user's config dir (--config-dir), where the broken fleet file goes
    root: Path  # where the example fleets' clusters keep their storage (never created)


@pytest.fixture(scope="module")
def setting(spillway_home: Path) -> Iterator[Setting]:
    base = spillway_home / "bad-input"
    running = start(base / "controller", poll_s=60.0)
    home = running.client_home(base / "cli-home")
    (base / "conf" / "fleet").mkdir(parents=True)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SPILLWAY_HOME", str(home))
            env.delenv(CONFIG_DIR_ENV, raising=False)
            yield Setting(running, home, base / "conf", base / "storage")
    finally:
        running.actor.close()


def files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))}


def books(running: Running) -> tuple:
    """The controller's jobs and every event it recorded, as seen in its state."""
    state = running.actor.controller.state
    jobs = state.list_jobs()
    events = [(e.job_id, e.kind, e.at) for j in jobs for e in state.events(j.job_id)]
    return tuple((j.job_id, j.state) for j in jobs), tuple(events)


def spillway(*argv: str) -> tuple[int, str, str]:
    """`spillway ARGV` in this process: (exit code, stdout, stderr); the environment the CLI
    sets (--config-dir) is undone after."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env:
        env.delenv(CONFIG_DIR_ENV, raising=False)  # restored to what it is now, on the way out
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse's refusals
                code = exc.code
    return code, out.getvalue(), err.getvalue()


def refused_naming(s: Setting, argv: list[str], keys: tuple[str, ...]) -> str:
    """Run the CLI; assert exit 2, one line naming one of `keys`, no traceback, and that
    neither the controller's books nor the CLI's home changed. Returns the line."""
    before_books, before_files = books(s.running), files(s.home)
    code, out, err = spillway(*argv)
    lines = err.splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and "Traceback" not in err and out == "", (argv, err)
    line = lines[0]
    assert line.startswith(PREFIX), (argv, line)
    key, sep, problem = line[len(PREFIX) :].partition(": ")
    assert sep and problem.strip(), (argv, line)
    assert any(key == k or key.startswith(f"{k}[") for k in keys), (argv, keys, line)
    assert books(s.running) == before_books, f"{argv} reached the controller"
    assert files(s.home) == before_files, f"{argv} wrote under SPILLWAY_HOME"
    return line


def test_a_good_launch_reaches_this_controller(setting: Setting) -> None:
    """The control: the same route, with good input, records a job. So a bad one that got
    past the CLI would be seen in the books."""
    before = books(setting.running)[0]
    code, out, err = spillway("launch", *TINY, "run_name=control", "--json")
    assert code == 0, err
    job_id = out.strip().split('"')[-2]
    after = books(setting.running)[0]
    assert len(after) == len(before) + 1 and job_id in {j for j, _ in after}
    # Cancelled, so that no waiting job adds events while the properties compare the books.
    setting.running.client().cancel(job_id)


# ---- broken run overrides ------------------------------------------------------------------
IDENT = st.from_regex(r"[a-z][a-z0-9_]{2,12}", fullmatch=True)
# Words OmegaConf takes for a bool, and Hydra for a float: not wrong types for those fields.
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}
FLOAT_WORDS = {"nan", "inf", "infinity", "null", "none"}
WORD = IDENT.filter(lambda w: w not in BOOL_WORDS | FLOAT_WORDS)

INT_KEYS = [
    "trainer.max_steps", "trainer.global_batch_size", "trainer.micro_batch_size",
    "trainer.log_every", "trainer.collective_timeout_s", "trainer.seed", "data.seq_len",
    "data.vocab_size", "model.dim", "model.n_heads", "optim.warmup_steps",
    "checkpoint.every_steps", "checkpoint.keep", "resources.devices", "placement.priority",
    "placement.max_restarts",
]  # fmt: skip
FLOAT_KEYS = [
    "optim.lr", "optim.grad_clip", "optim.min_lr_ratio", "model.dropout",
    "logger.metrics_flush_s", "placement.drain_timeout_s", "placement.lease_drain_margin_s",
    "placement.spill_after_s", "placement.min_lease_left_s", "fleet.lost_after_s",
]  # fmt: skip
BOOL_KEYS = ["trainer.compile", "trainer.activation_checkpointing", "placement.return_home"]
CHOICES = {
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.param_dtype": ("fp32", "bf16"),
    "data.kind": ("synthetic", "memmap", "repo_text"),
    "data.dtype": ("uint16", "uint32"),
    "optim.name": ("adamw",),
    "logger.kind": ("none", "wandb"),
    "logger.mode": ("offline", "online", "disabled"),
    "placement.recovery": ("restart", "failover"),
}
GROUPS = ("model", "data", "optim", "trainer", "checkpoint", "logger", "placement", "fleet")
NON_FINITE = st.sampled_from(["nan", "inf", "-inf"])


def below(low: int) -> st.SearchStrategy[str]:
    return st.integers(-10_000, low - 1).map(str)


# Each key with values its check refuses; the refusal names the key.
RANGES: list[tuple[str, st.SearchStrategy[str]]] = [
    ("trainer.max_steps", below(1)),
    ("trainer.global_batch_size", below(1)),
    ("trainer.micro_batch_size", below(1)),
    ("trainer.log_every", below(1)),
    ("trainer.collective_timeout_s", below(1)),
    ("trainer.stop_at_step", st.one_of(below(1), st.integers(301, 10_000).map(str))),
    ("data.seq_len", st.one_of(below(2), st.integers(257, 100_000).map(str))),
    ("data.vocab_size", st.one_of(below(2), st.integers(257, 100_000).map(str))),
    ("model.n_kv_heads", st.sampled_from(["3", "5", "0", "-2"])),
    ("model.dropout", st.floats(1.0, 1e6).map(repr)),
    ("optim.lr", st.floats(-1e6, 0.0).map(repr)),
    ("optim.warmup_steps", below(0)),
    ("optim.min_lr_ratio", st.floats(1.0001, 1e6).map(repr)),
    ("optim.grad_clip", st.floats(-1e6, -1e-6).map(repr)),
    ("checkpoint.every_steps", below(1)),
    ("checkpoint.keep", below(2)),
    ("logger.metrics_flush_s", st.floats(-1e6, -1e-6).map(repr)),
    ("placement.drain_timeout_s", st.floats(-1e6, 0.0).map(repr)),
    ("placement.lease_drain_margin_s", st.floats(-1e6, -1e-6).map(repr)),
    ("placement.spill_after_s", st.floats(-1e6, -1e-6).map(repr)),
    ("placement.min_lease_left_s", st.floats(-1e6, -1e-6).map(repr)),
    ("placement.budget", st.floats(-1e6, -1e-6).map(repr)),
    ("placement.max_restarts", below(0)),
    ("placement.copy_limit_mb_s", st.floats(-1e6, 0.0).map(repr)),
    ("resources.min_devices", st.one_of(below(1), st.integers(3, 64).map(str))),
    ("fleet.lost_after_s", st.floats(-1e6, 0.0).map(repr)),
]
EXIT_CODES = st.one_of(
    st.integers(-300, 0), st.integers(256, 100_000), st.sampled_from([69, 74, 75, 76, 78])
)


OVERRIDE_CASES = [
    "int", "float", "bool", "non_finite", "choice", "unknown_key", "added_key",
    "unknown_top", "unknown_option", "world_size", "batch", "exit_codes", "exit_code_type",
    "clusters", "device_types", "lease",
]  # fmt: skip


@st.composite
def broken_override(draw: st.DrawFn, case: str) -> tuple[list[str], tuple[str, ...]]:
    """One broken override of kind `case` (or two that clash); the keys its refusal may name."""
    if case == "int":
        key = draw(st.sampled_from(INT_KEYS))
        value = draw(st.one_of(WORD, st.integers(-100, 100).map(lambda i: f"{i}.5")))
        return [f"{key}={value}"], (key,)
    if case == "float":
        key = draw(st.sampled_from(FLOAT_KEYS))
        return [f"{key}={draw(WORD)}"], (key,)
    if case == "bool":
        key = draw(st.sampled_from(BOOL_KEYS))
        return [f"{key}={draw(WORD)}"], (key,)
    if case == "non_finite":
        key = draw(st.sampled_from(FLOAT_KEYS))
        return [f"{key}={draw(NON_FINITE)}"], (key,)
    if case == "choice":
        key = draw(st.sampled_from(sorted(CHOICES)))
        value = draw(WORD.filter(lambda w, k=key: w not in CHOICES[k]))
        return [f"{key}={value}"], (key,)
    if case in ("unknown_key", "added_key"):
        group = draw(st.sampled_from(GROUPS))
        fields = SCHEMA_GROUPS[group].__dataclass_fields__
        name = draw(IDENT.filter(lambda w, f=fields: w not in f))
        plus = "+" if case == "added_key" else ""
        return [f"{plus}{group}.{name}=1"], (f"{group}.{name}",)
    if case == "unknown_top":
        name = draw(IDENT.filter(lambda w: w not in TOP_LEVEL))
        return [f"{name}=1"], (name,)
    if case == "unknown_option":
        group = draw(st.sampled_from(["model", "data", "optim", "trainer", "logger", "fleet"]))
        return [f"{group}={draw(IDENT.filter(lambda w: w not in OPTIONS))}"], (group,)
    if case == "world_size":
        # More devices than any cluster of the local fleet has (the partner: 4).
        devices = draw(st.sampled_from([8, 16]))
        return [f"resources.devices={devices}"], ("resources.devices",)
    if case == "batch":
        devices = draw(st.sampled_from([3, 4]))
        batch = draw(st.integers(1, 200).filter(lambda b, d=devices: b % d))
        return [f"resources.devices={devices}", f"trainer.global_batch_size={batch}"], (
            "resources.devices",
        )
    if case == "exit_codes":
        bad = draw(EXIT_CODES)
        codes = draw(st.permutations([1, bad]))
        return [f"placement.user_error_exit_codes=[{','.join(map(str, codes))}]"], (
            "placement.user_error_exit_codes",
        )
    if case == "exit_code_type":
        value = draw(st.one_of(WORD.map(lambda w: f"[{w}]"), st.integers(1, 9).map(str)))
        return [f"placement.user_error_exit_codes={value}"], ("placement.user_error_exit_codes",)
    if case == "clusters":
        name = draw(IDENT.filter(lambda w: w not in ("home", "partner")))
        return [f"placement.clusters=[{name}]"], ("placement.clusters",)
    if case == "device_types":
        kind = draw(IDENT.filter(lambda w: w != "cpu"))
        # admission names resources.devices for "no accepted cluster has device type ...".
        return [f"placement.device_types=[{kind}]"], ("placement.device_types", "resources.devices")
    if case == "lease":
        value = draw(st.sampled_from(["+0s", "soon", "30m", "+-5m", "tomorrow"]))
        return [f"fleet.clusters.partner.lease_end={value}"], ("fleet.clusters.partner.lease_end",)
    raise AssertionError(f"no case {case}")


# Overrides Hydra cannot read, or reads into something that is not a run config.
SYNTAX = [
    ("trainer.max_steps", "overrides"), ("trainer.max_steps=[", "overrides"),
    ("a..b=1", "overrides"), ("=3", "overrides"), ("+=1", "overrides"), ("~=1", "overrides"),
    ("model=tiny,small", "overrides"), ("trainer=", "trainer"), ("data.path=${oops}", "data.path"),
    ("hydra.job.name=x", "hydra.job.name"), ("+hydra.searchpath=[/x]", "hydra.searchpath"),
    ("~hydra", "hydra"),
]  # fmt: skip


TOP_LEVEL = set(RunConfig.__dataclass_fields__)
OPTIONS = {name for group in SCHEMA_GROUPS for name in options(group)}
NOISE = ["data=synthetic", "run_name=generated", "trainer.log_every=5", "checkpoint.keep=3"]


@pytest.mark.parametrize(("key", "values"), RANGES, ids=[key for key, _ in RANGES])
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_numbers_out_of_range_are_refused_naming_the_key(
    setting: Setting, key: str, values: st.SearchStrategy[str], data: st.DataObject
) -> None:
    refused_naming(setting, ["launch", "data=synthetic", f"{key}={data.draw(values)}"], (key,))


@pytest.mark.parametrize("case", OVERRIDE_CASES)
@settings(max_examples=1, **SETTINGS)
@given(noise=st.lists(st.sampled_from(NOISE), unique=True), data=st.data())
def test_broken_run_overrides_are_refused_in_one_line_before_the_controller(
    setting: Setting, case: str, noise: list[str], data: st.DataObject
) -> None:
    overrides, keys = data.draw(broken_override(case))
    touched = {o.lstrip("+").split("=")[0].split(".")[0] for o in overrides}
    noise = [n for n in noise if n.split("=")[0].split(".")[0] not in touched]
    argv = data.draw(st.permutations([*overrides, *noise]))
    refused_naming(setting, ["launch", *argv], keys)


@pytest.mark.parametrize(("override", "key"), SYNTAX)
def test_overrides_hydra_cannot_read_or_that_are_hydras_own_are_refused(
    setting: Setting, override: str, key: str
) -> None:
    refused_naming(setting, ["launch", *TINY, override], (key,))


# ---- broken fleet files --------------------------------------------------------------------
CLUSTER_NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True).filter(
    lambda n: n not in RESERVED_CLUSTER_NAMES
)
CLUSTER_FIELDS = set(ClusterConfig.__dataclass_fields__)
FLEET_FIELDS = set(FleetConfig.__dataclass_fields__)
LEASE = {"lease_start": "2026-12-01T00:00:00Z", "lease_end": "2026-12-02T00:00:00Z"}


@st.composite
def good_fleet(draw: st.DrawFn, root: str) -> dict[str, Any]:
    """A fleet validate_fleet accepts: a local owned home first, then remote clusters."""
    names = draw(st.lists(CLUSTER_NAME, min_size=1, max_size=4, unique=True))
    clusters: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        devices = draw(st.integers(1, 8))
        if i == 0:
            clusters[name] = {"kind": "owned", "local": True, "devices": devices,
                              "storage_root": f"{root}/{name}"}  # fmt: skip
            continue
        host = f"10.0.{i}.{draw(st.integers(1, 254))}"
        cluster = {
            "kind": draw(st.sampled_from(["owned", "leased"])), "address": f"{host}:6379",
            "dashboard_url": f"http://{host}:8265", "token_path": f"/secrets/{name}",
            "device_type": draw(st.sampled_from(["cpu", "h100", "h200"])), "devices": devices,
            "device_resource": "GPU", "storage_root": f"s3://bucket-{i}/{name}",
            "cost_per_device_hour": draw(st.floats(0, 50)),
            "storage_options": {"client_kwargs": {"region_name": "us-east-1"}},
        }  # fmt: skip
        if cluster["kind"] == "leased":
            day = draw(st.integers(1, 20))
            cluster["lease_start"] = f"2026-12-{day:02d}T00:00:00Z"
            cluster["lease_end"] = f"2026-12-{day + draw(st.integers(1, 8)):02d}T00:00:00Z"
        clusters[name] = cluster
    return {"name": draw(st.sampled_from(["gen", "team-a", "x_1"])), "clusters": clusters}


# A mutation breaks one thing about a good fleet and returns the keys its refusal may name.
Mutation = Callable[[st.DrawFn, dict[str, Any]], tuple[str, ...]]


def _remote(draw: st.DrawFn, fleet: dict, kind: str | None = None) -> str:
    """A remote cluster's name, one added when the fleet has none (of that kind)."""
    names = [
        n for n, c in fleet["clusters"].items()
        if not c.get("local") and (kind is None or c["kind"] == kind)
    ]  # fmt: skip
    if names:
        return draw(st.sampled_from(names))
    name = draw(CLUSTER_NAME.filter(lambda n: n not in fleet["clusters"]))
    fleet["clusters"][name] = {
        "kind": kind or "leased", "address": "10.9.9.9:6379",
        "dashboard_url": "https://10.9.9.9:8265", "storage_root": f"gs://added/{name}",
    }  # fmt: skip
    if kind != "owned":
        fleet["clusters"][name].update(LEASE)
    return name


def _pick(draw: st.DrawFn, fleet: dict, which: str) -> str:
    if which == "home":
        return next(iter(fleet["clusters"]))
    if which == "any":
        return draw(st.sampled_from(sorted(fleet["clusters"])))
    return _remote(draw, fleet, None if which == "remote" else which)


DROP = object()  # setting_to(..., st.just(DROP)): the field is left out


def setting_to(which: str, field: str, values: st.SearchStrategy, name: str = "") -> Mutation:
    """Set (or drop) one field of one cluster: the home, any, a remote or a remote leased one."""

    def mutate(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
        name, value = _pick(draw, fleet, which), draw(values)
        fleet["clusters"][name][field] = value
        if value is DROP:
            del fleet["clusters"][name][field]
        return (f"fleet.clusters.{name}.{field}",)

    mutate.__name__ = name or f"{field}_{which}"
    return mutate


def no_clusters(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    fleet["clusters"] = {}
    return ("fleet.clusters",)


def no_owned(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    for c in fleet["clusters"].values():
        c.update({**LEASE, **c}, kind="leased")
    return ("fleet.clusters",)


def other_field(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    """Another field, chosen to break the cluster with it (it holds a valid value itself)."""
    name = _pick(draw, fleet, "home")
    case = draw(st.sampled_from(["uneven_nodes", "num_cpus", "lease_backwards", "dup"]))
    c = fleet["clusters"][name]
    if case == "uneven_nodes":
        c.update(devices=3, nodes=2)
        return (f"fleet.clusters.{name}.nodes",)
    if case == "num_cpus":
        c.update(devices=4, nodes=2, num_cpus=draw(st.sampled_from([1, 3, 7, 0, -2])))
        return (f"fleet.clusters.{name}.num_cpus",)
    if case == "lease_backwards":
        name = _remote(draw, fleet, "leased")
        c = fleet["clusters"][name]
        c["lease_start"], c["lease_end"] = (
            c["lease_end"],
            draw(st.sampled_from([c["lease_start"], c["lease_end"]])),
        )
        return (f"fleet.clusters.{name}.lease_end",)
    # The same dashboard, head or storage root as another cluster: the second is named.
    field = draw(st.sampled_from(["dashboard_url", "address", "storage_root"]))
    first = _remote(draw, fleet)
    second = draw(CLUSTER_NAME.filter(lambda n: n not in fleet["clusters"]))
    fresh = {"dashboard_url": "http://10.8.8.8:8265", "address": "10.8.8.8:6379",
             "storage_root": f"s3://other/{second}"}  # fmt: skip
    fleet["clusters"][second] = {**fleet["clusters"][first], **fresh}
    fleet["clusters"][second][field] = fleet["clusters"][first][field]
    return (f"fleet.clusters.{second}.{field}",)


def home_on_local_s3(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    name = _pick(draw, fleet, "home")
    fleet["clusters"][name]["local_s3"] = True  # with a path, not s3://BUCKET, for its root
    return (f"fleet.clusters.{name}.storage_root",)


def credential_option(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    """A credential among the public storage options, at the top or nested."""
    name, field = _pick(draw, fleet, "any"), draw(st.sampled_from(["key", "secret", "Password"]))
    nested = draw(st.booleans())
    options = {"client_kwargs": {field: "s3cr3t"}} if nested else {field: "s3cr3t"}
    fleet["clusters"][name]["storage_options"] = options
    return (f"fleet.clusters.{name}.storage_options.{'client_kwargs.' * nested}{field}",)


def fleet_field(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    case = draw(st.sampled_from(["duration", "name", "unknown", "controller"]))
    if case == "duration":
        field = draw(st.sampled_from(DURATIONS))
        fleet[field] = draw(st.one_of(st.floats(-1e6, 0.0), st.sampled_from(NON_FINITE_FLOATS)))
        return (f"fleet.{field}",)
    if case == "name":
        fleet["name"] = draw(st.sampled_from(["a/b", "../up", "", "two words", "x" * 40, ".h"]))
        return ("fleet.name",)
    if case == "unknown":
        field = draw(IDENT.filter(lambda w: w not in FLEET_FIELDS))
        fleet[field] = 1
        return (f"fleet.{field}",)
    field, value = draw(
        st.sampled_from(
            [("port", 0), ("port", 70000), ("port", "x"), ("url", "ftp://h/"), ("host", ""),
             ("token_path", "relative/token"), ("token_env", "1NOPE")]
        )
    )  # fmt: skip
    fleet["controller"] = {field: value}
    return (f"fleet.controller.{field}",)


def cluster_name(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    bad = draw(st.sampled_from([*RESERVED_CLUSTER_NAMES, "a/b", "two words", "-x", "a.b", "é"]))
    victim = _pick(draw, fleet, "any")
    fleet["clusters"] = {(bad if n == victim else n): c for n, c in fleet["clusters"].items()}
    return (f"fleet.clusters.{bad}",)


def both_credentials(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    name = _pick(draw, fleet, "any")
    fleet["clusters"][name].update(
        storage_credentials_file="/secrets/c.json", storage_credentials_env="CREDS"
    )
    return (f"fleet.clusters.{name}.storage_credentials_env",)


def unknown_cluster_key(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    name = _pick(draw, fleet, "any")
    field = draw(IDENT.filter(lambda w: w not in CLUSTER_FIELDS))
    fleet["clusters"][name][field] = 4
    return (f"fleet.clusters.{name}.{field}",)


def not_a_mapping(draw: st.DrawFn, fleet: dict) -> tuple[str, ...]:
    name = _pick(draw, fleet, "any")
    fleet["clusters"][name] = draw(st.sampled_from([5, "home", [1, 2]]))
    # Hydra cannot say where a list met the mapping it merges onto: the group is named.
    return (f"fleet.clusters.{name}", "fleet")


NON_FINITE_FLOATS = [math.nan, math.inf, -math.inf]
NOT_A_KIND = WORD.filter(lambda w: w not in ("owned", "leased"))
MUTATIONS: list[Mutation] = [
    no_clusters, no_owned, other_field, fleet_field, cluster_name, both_credentials,
    not_a_mapping, home_on_local_s3, credential_option, unknown_cluster_key,
    # Settings only a local cluster takes, on a remote one; isolation on the controller's.
    setting_to("remote", "nodes", st.just(2)), setting_to("remote", "isolated", st.just(True)),
    setting_to("remote", "local_s3", st.just(True)), setting_to("home", "isolated", st.just(True)),
    setting_to("any", "kind", NOT_A_KIND),
    setting_to("any", "devices", st.one_of(st.integers(-100, 0), st.sampled_from(["x", 2.5]))),
    setting_to("any", "cost_per_device_hour",
               st.one_of(st.floats(-1e6, -1e-3), st.sampled_from(NON_FINITE_FLOATS))),
    setting_to("any", "device_type", st.sampled_from(["", " ", "h 100"])),
    setting_to("any", "device_resource", st.sampled_from(["", "G PU"])),
    setting_to("remote", "dashboard_url",
               st.sampled_from(["ftp://10.0.0.1:8265", "10.0.0.1:8265", "http://", "http://h:x"])),
    setting_to("remote", "address",
               st.sampled_from(["nohostport", "10.0.0.1:0", "10.0.0.1:99999", ":6379"])),
    setting_to("any", "storage_root",
               st.sampled_from(["relative/dir", "nosuchproto://x/y", "memory://run", "s3://", ""])),
    setting_to("any", "storage_options", st.sampled_from([5, "x"])),
    setting_to("leased", "lease_start", st.sampled_from(["soon", "30m", "2026-13-01", "+30m"])),
    setting_to("leased", "lease_end", st.sampled_from(["soon", "+-5m", "+0s", "tomorrow"])),
    setting_to("home", "lease_end", st.just("2026-12-31T00:00:00Z")),  # a lease on an owned one
    setting_to("home", "nodes", st.integers(-5, 0)),
    setting_to("any", "token_path", st.sampled_from(["secrets/t", "./t"])),
    setting_to("any", "storage_credentials_file", st.just("creds.json")),
    setting_to("any", "token_env", st.sampled_from(["HAS-DASH", "9LIVES", ""])),
    setting_to("remote", "address", st.just(DROP), "no_address"),
    setting_to("remote", "dashboard_url", st.just(DROP), "no_dashboard_url"),
    setting_to("any", "storage_root", st.just(DROP), "no_storage_root"),
    setting_to("leased", "lease_end", st.just(DROP), "no_lease_end"),
    # The hole the issue names: a remote lease with an end and no start.
    setting_to("leased", "lease_start", st.just(DROP), "no_lease_start"),
]  # fmt: skip


def the_controllers_check(fleet: dict) -> None:
    """checks.controller_fleet less the look for token files on the controller's machine."""
    validate_fleet(typed_fleet(fleet))


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_broken_fleet_files_are_refused_by_the_cli_and_the_controller_alike(
    setting: Setting, mutation: Mutation, data: st.DataObject
) -> None:
    fleet = data.draw(good_fleet(str(setting.root)))
    the_controllers_check(json.loads(json.dumps(fleet)))  # good before the mutation
    keys = mutation(data.draw, fleet)
    text = yaml.safe_dump(fleet, sort_keys=False)  # in order: home first
    (setting.conf / "fleet" / "generated.yaml").write_text(text)
    argv = ["--config-dir", str(setting.conf), "launch", "fleet=generated", *TINY]
    line = refused_naming(setting, argv, keys)
    # The controller, handed the same fleet, refuses it naming the same key; where the file
    # composed, with the very same line.
    with pytest.raises(ConfigError) as refusal:
        the_controllers_check(yaml.safe_load(text))
    theirs = refusal.value
    assert theirs.key in keys and line[len(PREFIX) :].startswith(theirs.key), (line, theirs)
    # Hydra adds the file a wrong type came from, and a missing value's hint.
    if "(in fleet/" not in line and "is required" not in line:
        assert line == f"{PREFIX}{theirs}", (line, str(theirs))


def test_a_fleet_file_that_is_not_yaml_is_one_line_naming_the_group(setting: Setting) -> None:
    (setting.conf / "fleet" / "generated.yaml").write_text("name: gen\nclusters: [\n")
    line = refused_naming(
        setting, ["--config-dir", str(setting.conf), "launch", "fleet=generated"], ("fleet",)
    )
    assert "not valid YAML" in line and re.search(r"line \d+, column \d+", line)


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["launch", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
     ([], "the following arguments are required: COMMAND"),
     (["fleet"], "the following arguments are required: ACTION"),
     (["no-such-command"], "invalid choice: 'no-such-command'")],
)  # fmt: skip
def test_bad_arguments_are_one_line_and_exit_2(setting: Setting, argv, words) -> None:
    before_books, before_files = books(setting.running), files(setting.home)
    code, out, err = spillway(*argv)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, (code, err)
    assert words in err and "usage:" not in err and "(see spillway" in err
    assert books(setting.running) == before_books and files(setting.home) == before_files
