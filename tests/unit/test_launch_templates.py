"""launch/ checked the way each tool reads it, and against the fleet file that names it.

The Ray cluster launcher YAML goes through Ray's own preparation and validator (the schema
Ray ships); its commands run in bash. The KubeRay manifest is read as the operator and the
Kubernetes API read it. The Slurm script is parsed by bash, its directives checked against
sbatch's option table, and it runs end to end against small stand-ins for Slurm's commands and
for `ray` (no Slurm and no GPUs here), so what each `ray start` gets is recorded, not assumed.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from omegaconf import OmegaConf
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.config import compose_run
from orchestrator.config.schema import FleetConfig
from orchestrator.fleet.checks import validate_fleet

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
RAY_YAML = LAUNCH / "ray-cluster.yaml"
KUBERAY_YAML = LAUNCH / "kuberay-raycluster.yaml"
DOCKERFILE = LAUNCH / "Dockerfile"
SBATCH = LAUNCH / "slurm-ray.sbatch"


def requirement(name: str) -> str:
    """The dependency NAME as pyproject.toml states it, e.g. torch>=2.11,<2.14."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'^\s*"({re.escape(name)}(\[[^\]]*\])?[<>=!~][^"]*)"', text, re.M)
    assert match, f"pyproject.toml names no {name} dependency"
    return match.group(1)


def ray_minor() -> str:
    """2.60 for ray[default]==2.60.*: every template runs that Ray."""
    match = re.fullmatch(r"ray\[default\]==(\d+\.\d+)\.\*", requirement("ray"))
    assert match, requirement("ray")
    return match.group(1)


def torch_spec() -> str:
    return requirement("torch").removeprefix("torch")


@pytest.fixture
def work_dir(spillway_home: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the tests' SPILLWAY_HOME."""
    path = spillway_home / "launch-templates" / request.node.name
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def fleet():
    return compose_run(["fleet=example_partner"]).fleet


# --- Ray cluster launcher --------------------------------------------------------------


@pytest.fixture
def ray_config() -> dict:
    return yaml.safe_load(RAY_YAML.read_text())


def test_ray_cluster_yaml_passes_rays_own_validator(ray_config):
    # What `ray up` does before it talks to the cloud: fill in the provider's defaults, then
    # validate against ray-schema.json.
    validate_config(copy.deepcopy(ray_config))
    prepared = prepare_config(copy.deepcopy(ray_config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_rays_validator_refuses_a_misspelt_key(ray_config):
    # The check above can fail: the shipped schema allows no unknown key.
    ray_config["setup_comands"] = ray_config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(ray_config))


def run_launcher_command(command: str, home: Path, stub_bin: Path) -> subprocess.CompletedProcess:
    """One launcher command in its own bash, as the launcher runs it on a node."""
    env = {
        "HOME": str(home),
        "PATH": f"{stub_bin}:{os.environ['PATH']}",
        "RAY_HEAD_IP": "10.0.0.1",
        "RECORD": str(home / "ray-calls"),
    }
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30
    )


def write_stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


RAY_STUB = """\
# A stand-in for `ray`: one line per call with its arguments and auth environment.
printf '%s|%s|%s|%s\\n' "${SRUN_NODE:-}" "$*" "${RAY_AUTH_MODE:-}" "${RAY_AUTH_TOKEN_PATH:-}" \\
    >>"$RECORD"
"""


def test_every_ray_start_has_token_auth_with_the_mounted_token(ray_config, fleet, work_dir):
    stub_bin = work_dir / "bin"
    stub_bin.mkdir()
    write_stub(stub_bin / "ray", RAY_STUB)
    # The token file the launcher copies onto every node is the fleet file's token_path.
    mounts = ray_config["file_mounts"]
    (token_target,) = [dst for dst, src in mounts.items() if "secrets" in dst]
    assert (
        Path(mounts[token_target]).expanduser()
        == Path(fleet.clusters.partner.token_path).expanduser()
    )
    token_on_node = str(work_dir / token_target.removeprefix("~/"))

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (work_dir / "ray-calls").unlink(missing_ok=True)
        for command in ray_config[key]:
            done = run_launcher_command(command, work_dir, stub_bin)
            assert done.returncode == 0, (command, done.stderr)
        calls = [line.split("|") for line in (work_dir / "ray-calls").read_text().splitlines()]
        starts = [c for c in calls if c[1].startswith("start")]
        assert len(starts) == 1, (key, calls)
        _, args, mode, token_path = starts[0]
        assert mode == "token", (key, args)
        assert token_path == token_on_node, (key, args)
        if key == "head_start_ray_commands":
            assert "--head" in args.split() and "--dashboard-host=0.0.0.0" in args.split()
        else:
            assert "--address=10.0.0.1:6379" in args.split()


def test_setup_installs_spillway_against_the_installed_torch(ray_config):
    commands = ray_config["setup_commands"]
    wheel_dir = next(dst for dst, src in ray_config["file_mounts"].items() if src == "./dist")
    torch_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*torch", c))
    assert torch_spec() in commands[torch_at], "torch as pyproject.toml requires it"
    spillway_at = next(i for i, c in enumerate(commands) if "spillway-*.whl" in c)
    words = shlex.split(commands[spillway_at])
    assert f"{wheel_dir}/spillway-*.whl" in words and "s3fs" in words
    constraints = words[words.index("-c") + 1]
    # The constraints file pins the torch installed before, so pip cannot swap its build.
    assert any(
        "pip freeze" in c and "torch" in c and c.rstrip().endswith(f"> {constraints}")
        for c in commands[torch_at + 1 : spillway_at]
    )
    image_ray = re.fullmatch(
        r"rayproject/ray:(\d+\.\d+)\.\d+-py3\d+-gpu", ray_config["docker"]["image"]
    )
    assert image_ray and image_ray.group(1) == ray_minor()


def storage_probe(ray_config) -> str:
    (probe,) = [c for c in ray_config["setup_commands"] if "SPILLWAY_STORAGE_ROOT=" in c]
    return probe


def test_the_storage_root_is_the_fleet_files_and_the_nodes_prove_they_can_write_it(
    ray_config, fleet, work_dir
):
    probe = storage_probe(ray_config)
    root = re.search(r"SPILLWAY_STORAGE_ROOT=(\S+?);", probe).group(1)
    assert root == fleet.clusters.partner.storage_root
    stub_bin = work_dir / "bin"
    stub_bin.mkdir()
    write_stub(stub_bin / "python", f'exec {sys.executable} "$@"\n')

    writable = work_dir / "bucket"
    writable.mkdir()
    done = run_launcher_command(probe.replace(root, str(writable)), work_dir, stub_bin)
    assert done.returncode == 0, done.stderr
    assert "storage root writable" in done.stdout and list(writable.iterdir()) == []

    not_a_dir = work_dir / "a-file"
    not_a_dir.write_text("")
    done = run_launcher_command(probe.replace(root, str(not_a_dir)), work_dir, stub_bin)
    assert done.returncode != 0


def test_ray_cluster_has_the_devices_and_ports_the_fleet_file_names(ray_config, fleet):
    partner = fleet.clusters.partner
    workers = [t for name, t in ray_config["available_node_types"].items() if name != "head"]
    assert all(t["min_workers"] == t["max_workers"] for t in workers), "a fixed-size cluster"
    assert sum(t["min_workers"] * t["resources"]["GPU"] for t in workers) == partner.devices
    assert ray_config["available_node_types"]["head"]["resources"]["GPU"] == 0
    dashboard_port = int(partner.dashboard_url.rsplit(":", 1)[1])
    (head_start,) = [c for c in ray_config["head_start_ray_commands"] if "ray start" in c]
    assert f"--dashboard-port={dashboard_port}" in head_start.split()
    opened = {p["FromPort"] for p in ray_config["provider"]["security_group"]["IpPermissions"]}
    assert dashboard_port in opened


# --- KubeRay ---------------------------------------------------------------------------

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Kubernetes' IANA_SVC_NAME: what a container port's name must be.
PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?")
KUBERAY_HEAD_LABELS = {"ray.io/node-type": "head"}  # plus ray.io/cluster: <name>


@pytest.fixture
def manifests() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    return by_kind


def ray_pod_specs(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(group, rayStartParams, pod spec) for the head and every worker group."""
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    groups = [("head", head["rayStartParams"], head["template"]["spec"])]
    for group in spec.get("workerGroupSpecs", []):
        groups.append((group["groupName"], group["rayStartParams"], group["template"]["spec"]))
    return groups


def env_of(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"{container['name']}: an env name twice"
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_manifest_holds_the_cluster_its_volume_and_its_api(manifests):
    assert set(manifests) == {"PersistentVolumeClaim", "RayCluster", "Service"}
    assert manifests["RayCluster"]["apiVersion"] == "ray.io/v1"
    for doc in manifests.values():
        assert DNS_LABEL.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]


def test_raycluster_reads_as_the_operator_reads_it(manifests):
    cluster = manifests["RayCluster"]
    version = cluster["spec"]["rayVersion"]
    assert version.rsplit(".", 1)[0] == ray_minor()
    assert tuple(int(p) for p in version.split(".")[:2]) >= (2, 52), "token auth needs 2.52+"
    workers = cluster["spec"]["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert DNS_LABEL.fullmatch(group["groupName"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, params, pod in ray_pod_specs(cluster):
        # rayStartParams is map[string]string in the CRD: a bare 8 would be refused.
        assert all(isinstance(v, str) for v in params.values()), (name, params)
        ray_container = pod["containers"][0]  # KubeRay's RayContainerIndex
        assert re.fullmatch(r"[^\s:]+(:\d+)?/\S+:[\w.-]+", ray_container["image"]), name
        declared = {v["name"] for v in pod.get("volumes", [])}
        for mount in ray_container.get("volumeMounts", []):
            assert mount["name"] in declared, (name, mount)
        for port in ray_container.get("ports", []):
            assert PORT_NAME.fullmatch(port["name"]), (name, port)
        gpus = ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert params.get("num-gpus") == (gpus or "0"), (name, params, gpus)


def created_secret_keys() -> dict[str, set[str]]:
    """Each secret the manifest's instructions create, with its keys (--from-file/literal)."""
    comments = [
        line.removeprefix("#").strip()
        for line in KUBERAY_YAML.read_text().splitlines()
        if line.startswith("#")
    ]
    commands = " ".join(comments).replace("\\ ", " ").split("kubectl ")
    secrets: dict[str, set[str]] = {}
    for command in commands:
        if command.startswith("create secret generic "):
            words = command.split()
            secrets[words[3]] = {
                w.split("=", 2)[1]
                for w in words
                if w.startswith(("--from-file=", "--from-literal="))
            }
    assert secrets, "the manifest says how its secrets are made"
    return secrets


def test_every_ray_container_has_token_auth_from_a_secret(manifests):
    secrets = created_secret_keys()
    for name, _, pod in ray_pod_specs(manifests["RayCluster"]):
        env = env_of(pod["containers"][0])
        assert env["RAY_AUTH_MODE"].get("value") == "token", name
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets.get(ref["name"], set()), (name, ref, secrets)
        for source in pod["containers"][0].get("envFrom", []):
            assert source["secretRef"]["name"] in secrets, (name, source)


def test_head_keeps_the_controllers_state_on_the_claimed_volume(manifests):
    claim = manifests["PersistentVolumeClaim"]
    assert "ReadWriteOnce" in claim["spec"]["accessModes"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    _, _, head = ray_pod_specs(manifests["RayCluster"])[0]
    volumes = {v["name"]: v for v in head["volumes"]}
    container = head["containers"][0]
    state_dir = env_of(container)["SPILLWAY_HOME"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    source = volumes[mount["name"]]["persistentVolumeClaim"]
    assert source["claimName"] == claim["metadata"]["name"]
    assert not mount.get("readOnly", False)


def test_the_controller_on_the_head_finds_every_secret_the_fleet_file_names(manifests, fleet):
    _, _, head = ray_pod_specs(manifests["RayCluster"])[0]
    volumes = {v["name"]: v for v in head["volumes"]}
    secrets = created_secret_keys()
    # The image's user is ray: ~ is /home/ray on the head.
    mounted = {
        Path(m["mountPath"]): volumes[m["name"]]["secret"]["secretName"]
        for m in head["containers"][0]["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    named = [fleet.controller.token_path] + [
        p for c in fleet.clusters.values() for p in (c.token_path, c.storage_credentials_file) if p
    ]
    for path in named:
        on_head = Path(path.replace("~", "/home/ray", 1))
        assert on_head.parent in mounted, path
        assert on_head.name in secrets[mounted[on_head.parent]], path


def test_the_api_port_is_exposed_on_the_head(manifests, fleet):
    cluster = manifests["RayCluster"]
    _, _, head = ray_pod_specs(cluster)[0]
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    service = manifests["Service"]
    assert service["spec"]["selector"] == {
        "ray.io/cluster": cluster["metadata"]["name"],
        **KUBERAY_HEAD_LABELS,
    }
    (port,) = service["spec"]["ports"]
    assert ports[port["targetPort"]] == fleet.controller.port == port["port"]


def test_kuberay_cluster_has_the_devices_and_storage_the_fleet_file_names(manifests, fleet):
    home = fleet.clusters.home
    groups = manifests["RayCluster"]["spec"]["workerGroupSpecs"]
    assert sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in groups) == home.devices
    for name, _, pod in ray_pod_specs(manifests["RayCluster"]):
        env = env_of(pod["containers"][0])
        assert env["SPILLWAY_STORAGE_ROOT"]["value"] == home.storage_root, name


def test_the_image_runs_the_same_ray_and_installs_spillway_against_its_torch(manifests):
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py3\d+-gpu$", text, re.M)
    assert base and base.group(1) == manifests["RayCluster"]["spec"]["rayVersion"]
    assert f'"torch{torch_spec()}"' in text
    constraints = re.search(r"pip freeze \| grep -i '\^torch==' > (\S+)", text).group(1)
    assert re.search(
        rf"pip install [^\n]*-c {re.escape(constraints)} \\\n\s+\S*spillway-\*\.whl", text
    )


# --- Slurm -----------------------------------------------------------------------------

# sbatch's long options and whether each takes a value: Slurm's src/common/slurm_opt.c, every
# option with a common or an sbatch setter (master, August 2026), less --help/--usage/--version
# and --wrap (which replaces a script).
SBATCH_REQUIRED_ARG = set(
    """account acctg-freq array batch bb bbf begin chdir cluster cluster-constraint clusters
    comment constraint container container-id context core-spec cores-per-socket cpu-freq
    cpus-per-gpu cpus-per-task deadline delay-boot dependency distribution error exclude export
    export-file extra extra-node-info gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket
    gpus-per-task gres gres-flags hint input job-name kill-on-invalid-dep licenses mail-type
    mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mem-update mincpus network nodefile
    nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket
    ntasks-per-tres open-mode output partition prefer priority profile qos reservation resources
    runtime segment signal sockets-per-node switches tasks-per-node thread-spec threads-per-core
    time time-min tmp tres-bind tres-per-task uid wait-all-nodes wckey""".split()
)
SBATCH_NO_ARG = set(
    """consolidate-segments contiguous external get-user-env hold ignore-pbs no-requeue
    overcommit oversubscribe parsable quiet reboot spread-job spread-segments stepmgr test-only
    use-min-nodes verbose wait""".split()
)
SBATCH_OPTIONAL_ARG = set(
    "exclusive nice no-kill oom-kill-step propagate requeue resv-ports".split()
)


def sbatch_directives(text: str) -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first command of the script."""
    directives = []
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            directives.append(stripped.removeprefix("#SBATCH").strip())
        elif stripped and not stripped.startswith("#"):
            break
    return directives


def test_sbatch_script_parses_in_bash():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_every_sbatch_directive_is_a_real_long_option_read_before_the_first_command():
    text = SBATCH.read_text()
    directives = sbatch_directives(text)
    assert len(directives) == text.count("#SBATCH"), "a directive after the first command"
    assert directives
    for directive in directives:
        match = re.fullmatch(r"--([a-z-]+)(=(\S+))?", directive)
        assert match, f"{directive!r}: use the long form --name[=value]"
        name, value = match.group(1), match.group(3)
        if name in SBATCH_REQUIRED_ARG:
            assert value, f"--{name} needs a value"
        elif name in SBATCH_NO_ARG:
            assert value is None, f"--{name} takes no value"
        else:
            assert name in SBATCH_OPTIONAL_ARG, f"--{name} is not an sbatch option"


NODES = ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]
SLURM_STUBS = {
    "scontrol": 'printf "%s\\n" ' + " ".join(NODES) + "\n",
    # %S is the allocation's start, %e its end.
    "squeue": 'case "$*" in *%S*) echo 2026-12-08T07:00:00;; *) echo 2026-12-08T15:00:00;; esac\n',
    "hostname": "echo 10.1.0.1\n",
    # A step runs here, on "the node" -w names, with the job's environment (--export=ALL).
    "srun": """\
node=
while (($#)); do
    case $1 in
        -w) node=$2; shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
SRUN_NODE=$node exec "$@"
""",
    "ray": RAY_STUB,
    # The venv's python: Spillway, Ray and torch import; the head counts the GPUs of the
    # nodes started so far; anything else is Python itself.
    "python": f"""\
case "$*" in
    *"import orchestrator"*) exit 0 ;;
    *cluster_resources*) echo $(( $(grep -c '|start' "$RECORD") * ${{SLURM_GPUS_PER_TASK}} )) ;;
    *) exec {sys.executable} "$@" ;;
esac
""",
}


def run_sbatch_script(work_dir: Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    venv_bin = work_dir / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name, body in SLURM_STUBS.items():
        write_stub(venv_bin / name, body)
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
    home = work_dir / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "TZ": "UTC",
        "RECORD": str(work_dir / "ray-calls"),
        "SPILLWAY_VENV": str(work_dir / "venv"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-[01-04]",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_GPUS_PER_TASK": "8",
        "STARTUP_TIMEOUT_S": "10",
    }
    done = subprocess.run(
        ["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60, cwd=work_dir
    )
    record = work_dir / "ray-calls"
    calls = [line.split("|") for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


def test_sbatch_script_starts_the_head_then_a_worker_per_node_with_the_token(work_dir):
    done, calls = run_sbatch_script(work_dir)
    assert done.returncode == 0, done.stderr
    starts = [c for c in calls if c[1].startswith("start")]
    # The head first; the workers start side by side once it answers.
    assert starts[0][0] == NODES[0] and sorted(node for node, *_ in starts[1:]) == NODES[1:]
    head_args = starts[0][1].split()
    assert "--head" in head_args and "--node-ip-address=10.1.0.1" in head_args
    for _, args, _, _ in starts[1:]:
        assert "--address=10.1.0.1:6379" in args.split() and "--head" not in args.split()
    token_paths = {token_path for *_, mode, token_path in starts if mode == "token"}
    assert len(token_paths) == 1 and len([c for c in starts if c[2] == "token"]) == len(NODES)
    token_file = Path(token_paths.pop())
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token_file.read_text().strip())


def test_sbatch_script_prints_a_cluster_the_fleet_file_accepts(work_dir):
    done, _ = run_sbatch_script(work_dir)
    assert done.returncode == 0, done.stderr
    block = done.stdout.split("In the fleet file:\n", 1)[1]
    clusters = yaml.safe_load(block)
    home = {"home": {"kind": "owned", "local": True, "storage_root": "/srv/spillway"}}
    fleet = OmegaConf.merge(OmegaConf.structured(FleetConfig), {"clusters": {**home, **clusters}})
    validate_fleet(fleet)
    slurm = fleet.clusters.slurm
    assert slurm.devices == len(NODES) * 8
    assert slurm.dashboard_url == "http://10.1.0.1:8265"
    assert slurm.storage_root.startswith("s3://")
    assert (slurm.lease_start, slurm.lease_end) == ("2026-12-08T07:00:00Z", "2026-12-08T15:00:00Z")


def test_sbatch_script_refuses_a_venv_without_spillway(work_dir):
    venv_bin = work_dir / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    write_stub(venv_bin / "python", "exit 1\n")
    (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
    env = {
        "HOME": str(work_dir),
        "PATH": os.environ["PATH"],
        "SPILLWAY_VENV": str(work_dir / "venv"),
    }
    done = subprocess.run(
        ["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30, cwd=work_dir
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "has no Spillway" in done.stderr
