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

from trainables.cluster import (
    full_size_concurrency, full_size_nodes, load_cluster_config, main, opened_ports, security_findings,
    validate_cluster_config,
)
from trainables.resources import ResourceError, TrialResources

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
    # One GPU node from the start: the first trials need not wait for the autoscaler.
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

# ---- sizing the sweep --------------------------------------------------------------------------

def test_full_size_counts_each_worker_type_up_to_the_cluster_maximum():
    config = load_cluster_config(ROOT / "cluster.yaml")
    nodes, description = full_size_nodes(config)
    assert description == "head_cpu + 8 x gpu_1x + 2 x gpu_4x"
    assert sum(node.get("GPU", 0) for node in nodes) == 8 * 1 + 2 * 4
    capped = copy.deepcopy(config)
    capped["max_workers"] = 5  # the cluster-wide cap stops the types listed last
    assert full_size_nodes(capped)[1] == "head_cpu + 5 x gpu_1x"


@pytest.mark.parametrize(
    "workers, cpus, gpus, expected",
    [
        (1, 4, 1, 16),  # one per A10G: 8 on the 1-GPU nodes, 4 on each 4-GPU node
        (1, 8, 1, 8 + 2 * 4),  # 8 CPUs still fit each 4-GPU node four times (48 CPUs)
        (1, 4, 0.5, 32),  # half a GPU each
        (4, 16, 4, 4),  # four 1-GPU workers: two trials over the eight 1-GPU nodes, one per 4-GPU node
        (1, 1, 0, 8 + 8 * 8 + 2 * 48),  # CPU-only trials fit every node, the head included
    ],
)
def test_full_size_concurrency(workers, cpus, gpus, expected):
    config = load_cluster_config(ROOT / "cluster.yaml")
    advice = full_size_concurrency(config, TrialResources.per_trial(workers, cpus, gpus))
    assert advice.endswith(f"--max-concurrent {expected}")


def test_sizing_a_trial_no_node_type_holds_fails():
    config = load_cluster_config(ROOT / "cluster.yaml")
    with pytest.raises(ResourceError, match="16 GPU"):
        full_size_concurrency(config, TrialResources.per_trial(1, 4, 16))
    assert main([str(ROOT / "cluster.yaml"), "--gpus-per-trial", "16"]) == 1


def test_sizing_needs_declared_resources(capsys):
    config = load_cluster_config(ROOT / "cluster-local.yaml")
    with pytest.raises(ValueError, match="declare"):
        full_size_nodes(config)
    # Sizing is advice: the file itself is still valid and safe.
    assert main([str(ROOT / "cluster-local.yaml"), "--gpus-per-trial", "1"]) == 0
    assert "cannot size the sweep" in capsys.readouterr().out


def test_nonsense_trial_is_refused_with_exit_2(capsys):
    assert main([str(ROOT / "cluster.yaml"), "--workers-per-trial", "0"]) == 2
    assert "workers must be" in capsys.readouterr().err


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
