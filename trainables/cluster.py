"""Offline checks of a Ray cluster-launcher file (``cluster.yaml``, ``cluster-local.yaml``).

``ray up`` has no dry run, so a typo or an exposed dashboard is otherwise found only once
machines are paid for. :func:`load_cluster_config` validates against Ray's own schema the way
``ray up`` does (provider defaults merged first); :func:`security_findings` lists what would
leave the cluster open. Both use Ray's private ``prepare_config``/``validate_config``, which
is why pyproject pins Ray. Given what one trial asks for, it also says how many trials the
cluster holds at its largest: an autoscaling cluster starts small, so the sweep needs that
figure as ``--max-concurrent`` (it would otherwise size itself from the nodes alive at start).

    collapse-sweep cluster cluster.yaml           # or: python -m trainables.cluster cluster.yaml
    collapse-sweep cluster cluster.yaml --gpus-per-trial 1 --cpus-per-trial 4
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import jsonschema
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .resources import ResourceError, TrialResources, max_concurrent_trials

# Where file_mounts must put the token: the path the start commands give RAY_AUTH_TOKEN_PATH
# and the one Ray falls back to.
TOKEN_MOUNT = "~/.ray/auth_token"
SSH_PORT = 22

_RAY_START = re.compile(r"\bray start\b")
_DASHBOARD_ON_LOCALHOST = re.compile(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b")
_TOKEN_MODE = re.compile(r"\bRAY_AUTH_MODE=token\b")


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read a cluster-launcher YAML and return it as ``ray up`` sees it, or raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cluster config {path} does not exist; pass the path of cluster.yaml or cluster-local.yaml")
    return validate_cluster_config(yaml.safe_load(path.read_text()), source=str(path))


def validate_cluster_config(config: dict[str, Any], source: str = "cluster config") -> dict[str, Any]:
    """Merge the provider's defaults into ``config`` and check it against Ray's schema.

    Returns the merged config. Raises ValueError naming ``source`` and the offending key.
    """
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        where = ".".join(str(key) for key in err.absolute_path) or "top level"
        raise ValueError(f"{source}: {err.message} (at {where}); see ray/autoscaler/ray-schema.json") from None
    # ClickException: the local provider's own checks (head_ip, worker_ips) abort through click.
    except (ValueError, RuntimeError, KeyError, click.ClickException) as err:
        raise ValueError(f"{source}: {err}") from None
    return prepared


def ray_start_commands(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The head's and the workers' start commands that run ``ray start``."""
    head, workers = (
        [command for command in config.get(key, []) if _RAY_START.search(command)]
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
    )
    return head, workers


def opened_ports(config: dict[str, Any]) -> set[int]:
    """Every port the AWS security group's extra inbound rules open (-1 stands for all)."""
    rules = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    ports: set[int] = set()
    for rule in rules:
        low, high = rule.get("FromPort", -1), rule.get("ToPort", rule.get("FromPort", -1))
        ports.update({-1} if low == -1 else range(low, high + 1))
    return ports


def security_findings(config: dict[str, Any]) -> list[str]:
    """What in ``config`` would expose the cluster; empty when nothing does.

    Checked: the head starts Ray with the dashboard on localhost, every ``ray start`` turns on
    token auth in its own command (each start command runs in a fresh shell), the token file
    is file-mounted, the dashboard is not switched off (Train's placement-group clean-up needs
    it), and the security group opens nothing but SSH.
    """
    head, workers = ray_start_commands(config)
    findings = [] if head else ["no head start command runs `ray start --head`"]
    findings += [f"head start command lacks --dashboard-host=127.0.0.1: {c!r}" for c in head
                 if not _DASHBOARD_ON_LOCALHOST.search(c)]
    findings += [f"start command lacks RAY_AUTH_MODE=token: {c!r}" for c in head + workers
                 if not _TOKEN_MODE.search(c)]
    if TOKEN_MOUNT not in config.get("file_mounts", {}):
        findings.append(f"file_mounts does not put the token at {TOKEN_MOUNT}")
    findings += [f"command turns the dashboard off: {c!r}" for c in head + workers
                 if "--include-dashboard=false" in c.lower()]
    extra_ports = opened_ports(config) - {SSH_PORT}
    if extra_ports:
        findings.append(f"provider.security_group opens ports other than {SSH_PORT}: {sorted(extra_ports)}")
    return findings


def full_size_nodes(config: dict[str, Any]) -> tuple[list[dict[str, float]], str]:
    """The resources of every node when the cluster is at its largest, and a one-line description.

    The head plus each worker type at its ``max_workers``, in the order listed, until the
    cluster-wide ``max_workers`` is reached. Raises ValueError for a node type that does not
    declare its ``resources`` (Ray detects them only once the node runs).
    """
    types = config["available_node_types"]
    undeclared = sorted(name for name, spec in types.items() if not spec.get("resources"))
    if undeclared:
        raise ValueError(f"node types {', '.join(undeclared)} do not declare their resources (CPU, GPU)")
    head = config["head_node_type"]
    nodes, parts, room = [dict(types[head]["resources"])], [head], config.get("max_workers", 0)
    for name, spec in types.items():
        count = min(spec.get("max_workers", 0), room) if name != head else 0
        nodes += [dict(spec["resources"])] * count
        parts += [f"{count} x {name}"] if count else []
        room -= count
    return nodes, " + ".join(parts)


def full_size_concurrency(config: dict[str, Any], resources: TrialResources) -> str:
    """How many trials of ``resources`` the cluster holds at its largest, as advice for the sweep."""
    nodes, description = full_size_nodes(config)
    trials = max_concurrent_trials(resources, nodes)  # ResourceError when no node type holds one trial
    return f"at its largest ({description}) it holds {trials} such trials at once: run the sweep with --max-concurrent {trials}"


def parse_args(argv: Sequence[str] | None, prog: str = "collapse-sweep cluster") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Check Ray cluster-launcher files offline.")
    parser.add_argument("paths", nargs="+", metavar="CLUSTER_YAML")
    trial = parser.add_argument_group("one trial (give any to learn how many trials the cluster holds)")
    trial.add_argument("--workers-per-trial", type=int, help="DDP workers per trial (default 1)")
    trial.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    trial.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "collapse-sweep cluster") -> int:
    """Check each file; print what is wrong and return 1 if anything is."""
    args = parse_args(argv, prog)
    trial = {key: value for key in ("workers", "cpus", "gpus") if (value := getattr(args, f"{key}_per_trial")) is not None}
    resources = None
    if trial:
        try:
            resources = TrialResources.per_trial(**trial)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    failed = False
    for path in args.paths:
        try:
            config = load_cluster_config(path)
            findings = security_findings(config)
        except ValueError as err:
            config, findings = None, [str(err)]
        failed |= bool(findings)
        print(f"{path}: " + ("ok" if not findings else "\n  ".join(["INSECURE OR INVALID"] + findings)))
        if config is not None and resources is not None:
            try:
                print(f"  {full_size_concurrency(config, resources)}")
            except ResourceError as err:
                failed = True
                print(f"  TRIAL DOES NOT FIT: {err}")
            except ValueError as err:
                print(f"  cannot size the sweep: {err}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
