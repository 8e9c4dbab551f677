"""Multi-machine launch files: cluster.yaml / cluster-local.yaml against Ray's own schema and
the project's security rules, and the SLURM launcher's commands in its dry-run mode.

All offline: `ray up` and `sbatch` themselves can only be tried on a real cluster.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from trainables.cluster import load_cluster_config, opened_ports, security_findings, validate_cluster_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "cluster-local.yaml"]
SBATCH = ROOT / "slurm" / "ray_sweep.sbatch"


def raw(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module", params=CLUSTER_FILES)
def prepared(request) -> dict:
    return load_cluster_config(ROOT / request.param)


# ---- schema ---------------------------------------------------------------------------------

def test_aws_config_as_ray_up_sees_it():
    config = load_cluster_config(ROOT / "cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] == "head_cpu"
    workers = {name: spec for name, spec in types.items() if name != "head_cpu"}
    assert workers and all(0 <= spec["min_workers"] < spec["max_workers"] for spec in workers.values())
    # The sweep counts the GPUs alive when it starts: a cluster of CPU head only could not start it.
    assert any(spec["min_workers"] > 0 for spec in workers.values())
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]
    # setup_commands are merged in front of both node kinds' own set-up: shared storage first.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert "/shared" in config[key][1] and config[key][-1].startswith("cd ~/collapse-sweep")
    assert "+cpu" in config["head_setup_commands"][-1] and "+cu" in config["worker_setup_commands"][-1]


def test_local_config_keeps_every_listed_host():
    config = load_cluster_config(ROOT / "cluster-local.yaml")
    (node_type,) = config["available_node_types"].values()
    n_hosts = len(config["provider"]["worker_ips"])
    assert n_hosts >= 1 and node_type["min_workers"] == node_type["max_workers"] == n_hosts


def test_raw_yaml_is_not_what_ray_validates():
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(raw("cluster.yaml"))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_typo_key_is_rejected(name):
    config = raw(name)
    config["max_worker"] = config.pop("max_workers", 3)
    with pytest.raises(ValueError, match="max_worker"):
        validate_cluster_config(config, source=name)


def test_typo_in_node_type_is_rejected_with_its_path():
    config = raw("cluster.yaml")
    config["available_node_types"]["gpu_1x"]["min_worker"] = config["available_node_types"]["gpu_1x"].pop("min_workers")
    with pytest.raises(ValueError, match=r"min_worker.*available_node_types\.gpu_1x"):
        validate_cluster_config(config)


def test_unknown_head_node_type_is_rejected():
    config = raw("cluster.yaml")
    config["head_node_type"] = "head_gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_cluster_config(config)


def test_local_config_without_head_ip_is_rejected():
    config = raw("cluster-local.yaml")
    del config["provider"]["head_ip"]
    with pytest.raises(ValueError, match="cluster-local.yaml: .*head_ip"):
        validate_cluster_config(config, source="cluster-local.yaml")


def test_missing_file_is_named():
    with pytest.raises(ValueError, match="nope.yaml does not exist"):
        load_cluster_config(ROOT / "nope.yaml")


# ---- security -------------------------------------------------------------------------------

def test_shipped_configs_have_no_findings(prepared):
    assert security_findings(prepared) == []


def test_every_ray_start_is_authenticated_and_the_dashboard_local(prepared):
    # Written out here rather than through security_findings, so a bug there cannot hide one here.
    head = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in prepared["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and "--head" in head[0] and len(workers) == 1
    assert re.search(r"--dashboard-host=(127\.0\.0\.1|localhost)(\s|$)", head[0])
    for command in head + workers:
        assert "RAY_AUTH_MODE=token" in command.split("ray start")[0]
    every_command = yaml.safe_dump(prepared)
    assert "include-dashboard=false" not in every_command.lower() and "0.0.0.0" not in every_command
    assert prepared["file_mounts"]["~/.ray/auth_token"].startswith("~/.ray/")


def _break(config: dict, what: str) -> dict:
    config = copy.deepcopy(config)
    head_start = config["head_start_ray_commands"]
    if what == "dashboard":
        head_start[-1] = head_start[-1].replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
    elif what == "worker_auth":
        config["worker_start_ray_commands"][-1] = config["worker_start_ray_commands"][-1].replace(
            "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")
    elif what == "token_mount":
        del config["file_mounts"]["~/.ray/auth_token"]
    elif what == "no_dashboard":
        head_start[-1] += " --include-dashboard=false"
    elif what == "port":
        config["provider"]["security_group"]["IpPermissions"] = [
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    return config


@pytest.mark.parametrize("what, message", [
    ("dashboard", "dashboard-host"), ("worker_auth", "RAY_AUTH_MODE"), ("token_mount", "auth_token"),
    ("no_dashboard", "dashboard off"), ("port", r"\[8265\]"),
])
def test_each_weakening_is_reported(what, message):
    findings = security_findings(_break(load_cluster_config(ROOT / "cluster.yaml"), what))
    assert len(findings) == 1 and re.search(message, findings[0])


@pytest.mark.parametrize("rules, ports", [
    ([{"FromPort": 22, "ToPort": 22}], {22}),
    ([{"FromPort": 6379, "ToPort": 6381}], {6379, 6380, 6381}),
    ([{"IpProtocol": "-1"}], {-1}),
])
def test_opened_ports(rules, ports):
    assert opened_ports({"provider": {"security_group": {"IpPermissions": rules}}}) == ports


# ---- SLURM launcher -------------------------------------------------------------------------

def test_sbatch_script_parses():
    parsed = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr


def dry_run(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "NODES"}
    return subprocess.run(
        ["bash", str(SBATCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**clean, "DRY_RUN": "1", "SWEEP_RUNTIME_DIR": str(tmp_path / "rt"), **env},
    )


def test_sbatch_dry_run_commands(tmp_path):
    done = dry_run(tmp_path, ["dip_sbd", "--data", "/shared/brats", "--num-samples", "64"],
                   NODES="gpu01 gpu02 gpu03", HEAD_IP="10.1.0.1", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32")
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines() if not line.startswith("#")]
    starts = [c for c in commands if c[0] == "srun"]
    heads = [c for c in starts if "--head" in c]
    workers = [c for c in starts if "--head" not in c]
    token = str(tmp_path / "rt" / "auth_token")

    assert len(heads) == 1
    (head,) = heads
    assert head[head.index("-w") + 1] == "gpu01"
    assert {"--dashboard-host=127.0.0.1", "--port=6379", "--num-gpus=4", "--num-cpus=32", "--block"} <= set(head)
    assert sorted(w[w.index("-w") + 1] for w in workers) == ["gpu02", "gpu03"]
    assert all({"--address=10.1.0.1:6379", "--block", "--num-gpus=4"} <= set(w) for w in workers)
    for command in starts:
        assert {"RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={token}"} <= set(command)
        assert command.index("env") < command.index("start")

    sweep = commands[-1]
    assert sweep[0].endswith(".venv/bin/python")
    assert sweep[1:] == ["sweeps/run.py", "dip_sbd", "--data", "/shared/brats", "--num-samples", "64", "--address", "auto"]
    token_file = Path(token)
    assert re.fullmatch(r"[0-9a-f]{64}\n", token_file.read_text())
    assert token_file.stat().st_mode & 0o777 == 0o600


def test_sbatch_single_node_default_sweep(tmp_path):
    done = dry_run(tmp_path, [], NODES="solo")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 and "--head" in lines[0]
    assert shlex.split(lines[1])[1:] == ["sweeps/run.py", "dip_sbd", "--address", "auto"]


def test_sbatch_without_nodes_says_what_to_set(tmp_path):
    done = dry_run(tmp_path, [])
    assert done.returncode == 2 and "NODES=" in done.stderr
    assert not (tmp_path / "rt").exists()
