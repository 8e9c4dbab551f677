"""The sweep on a Ray cluster of several processes, started as a user would start one.

A head (``ray start --head``: token auth, dashboard on 127.0.0.1, a fixed metrics port) and a
worker node (``ray start --address``), one CPU each, on this machine. The smoke sweep goes in
as a Ray job (``ray job submit --working-dir``) and must

- see both nodes: two one-CPU trials at a time;
- show as a succeeded job in the dashboard's Jobs API, which refuses requests without the token;
- export each trial's AU, KL_raw and recon(mu) as Ray custom metrics tagged with the sweep and
  the trial, read back from the nodes' Prometheus endpoints while the job runs, with values
  the trials really reported;
- reach a real Prometheus (Debian's, on the config Ray writes for the head, whose service
  discovery lists both nodes) epoch by epoch as the trials wrote them, with the Ray dashboard
  told where that Prometheus is;
- keep Tune's TensorBoard event files, and log every trial to W&B (offline) and MLflow when asked.

The cluster's processes are told apart from any other Ray instance on the machine by their
own ``RAY_TMPDIR`` and are killed by that at the end (``ray stop`` would stop every Ray here).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import ray_folder
from sweeps.monitoring import (
    EXPORTED_METRICS, METRIC_PREFIX, MLFLOW_DB, STATUSES, TRACKERS, TRIALS_METRIC, check_trackers,
)
from vae.config import ConfigError

pytestmark = pytest.mark.system  # a two-node cluster and a Ray job: minutes

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
JOB_TIMEOUT_S = 420
# Prometheus text format: name{tag="value",...} value
_SAMPLE = re.compile(r"^(?P<name>\w+)\{(?P<tags>[^}]*)\} (?P<value>\S+)$")
_TAG = re.compile(r'(\w+)="([^"]*)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    env: dict[str, str]
    gcs_address: str
    dashboard_url: str
    metrics_urls: list[str]
    prometheus_url: str  # where the dashboard looks for Prometheus (started by the ``prometheus`` fixture)

    @property
    def token(self) -> str:
        return Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()


def node_ports() -> list[str]:
    """Ports a second node on the same machine would otherwise take from the first."""
    return [
        f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]


def kill_instance(ray_tmpdir: str) -> None:
    """SIGKILL every process of the Ray instance whose temp folder is ``ray_tmpdir``."""
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("RAY_TMPDIR") == ray_tmpdir:
                process.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


@pytest.fixture(scope="module")
def cluster(scratch):
    env = {
        **os.environ, **ray_folder(), "RAY_AUTH_MODE": "token",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` in the job
        "COLLAPSE_SWEEP_CACHE": str(scratch / "cache"),
        "RAY_metrics_report_interval_ms": "2000",  # export every 2 s instead of 10 s
    }
    gcs, dashboard, prometheus = free_port(), free_port(), free_port()
    env["RAY_PROMETHEUS_HOST"] = prometheus_url = f"http://127.0.0.1:{prometheus}"
    # Each node its own temp folder, as on separate machines: a node deletes the job's
    # unpacked working directory from its folder once it no longer needs it.
    head_ports = node_ports() + [f"--temp-dir={env['RAY_TMPDIR']}/head"]
    worker_ports = node_ports() + [f"--temp-dir={env['RAY_TMPDIR']}/worker"]
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}", *common, *head_ports],
            env=env, check=True, capture_output=True, text=True, timeout=120,
        )
        subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{gcs}", *common, *worker_ports],
            env=env, check=True, capture_output=True, text=True, timeout=120,
        )
        metrics = [f"http://127.0.0.1:{p.split('=')[1]}/metrics" for p in (head_ports[0], worker_ports[0])]
        yield LocalCluster(env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", metrics, prometheus_url)
    finally:
        kill_instance(env["RAY_TMPDIR"])


def scrape(urls: list[str]) -> list[tuple[str, dict[str, str], float]]:
    """Every (name, tags, value) sample of ours on the nodes' metrics endpoints."""
    samples = []
    for url in urls:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match and match["name"].startswith("ray_" + METRIC_PREFIX):
                samples.append((match["name"], dict(_TAG.findall(match["tags"])), float(match["value"])))
    return samples


def dashboard_get(cluster: LocalCluster, path: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(cluster.dashboard_url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


@pytest.fixture(scope="module")
def prometheus(cluster, scratch):
    """Debian's Prometheus on the config Ray wrote for the head, scraping every second (Ray's says 10 s)."""
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is not installed: apt-get install prometheus (.ci/run does)"
    ray_config = Path(cluster.env["RAY_TMPDIR"], "head", "session_latest", "metrics", "prometheus", "prometheus.yml")
    deadline = time.monotonic() + 60
    while not ray_config.exists():  # the head's dashboard writes it once it runs
        assert time.monotonic() < deadline, f"Ray wrote no Prometheus config at {ray_config}"
        time.sleep(0.2)
    config = yaml.safe_load(ray_config.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (scratch / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (scratch / "prometheus.log").open("w")
    server = subprocess.Popen(
        [binary, f"--config.file={scratch / 'prometheus.yml'}", f"--storage.tsdb.path={scratch / 'prometheus'}",
         f"--web.listen-address={cluster.prometheus_url.removeprefix('http://')}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not prometheus_targets(cluster.prometheus_url, healthy=True):
            assert server.poll() is None and time.monotonic() < deadline, (scratch / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        yield cluster.prometheus_url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def prometheus_get(url: str, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def prometheus_targets(url: str, healthy: bool = False) -> list[dict]:
    """The scrape targets Prometheus found (only those it scraped successfully, if ``healthy``)."""
    try:
        targets = prometheus_get(url, "/api/v1/targets")["activeTargets"]
    except OSError:
        return []
    return [t for t in targets if t["health"] == "up" or not healthy]


@pytest.fixture(scope="module")
def job(cluster, prometheus, scratch):
    """The smoke sweep submitted as a Ray job, with the metrics scraped while it ran."""
    results = scratch / "results"
    scraped: list[tuple[str, dict[str, str], float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            scraped.extend(scrape(cluster.metrics_urls))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        submitted = subprocess.run(
            [RAY, "job", "submit", f"--address={cluster.dashboard_url}", f"--working-dir={REPO}",
             "--submission-id=smoke-sweep", "--", "python", "sweeps/run.py", "dip_sbd", "--smoke",
             "--address", "auto", "--results", str(results), "--run", "job", "--log", "wandb", "--log", "mlflow"],
            env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
        )
    finally:
        done.set()
        poller.join()
    return submitted, results / "dip_sbd" / "job", scraped


def test_job_runs_the_sweep_on_both_nodes(job):
    submitted, out_dir, _ = job
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "2 at a time" in submitted.stdout  # two one-CPU nodes, one trial each
    with (out_dir / "trials.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_dashboard_lists_the_job_and_wants_the_token(cluster, job):
    status, _ = dashboard_get(cluster, "/api/jobs/", token=None)
    assert status == 401
    status, body = dashboard_get(cluster, "/api/jobs/", token=cluster.token)
    assert status == 200
    jobs = {entry.get("submission_id"): entry for entry in json.loads(body)}
    assert jobs["smoke-sweep"]["status"] == "SUCCEEDED"


def test_trial_metrics_reach_the_metrics_endpoint(job):
    _, out_dir, scraped = job
    study = json.loads((out_dir / "sweep.json").read_text())["study"]
    ours = [(name, tags, value) for name, tags, value in scraped if tags.get("sweep") == study and "trial" in tags]
    assert {name for name, _, _ in ours} == {"ray_" + METRIC_PREFIX + key for key in EXPORTED_METRICS}
    # the trials-by-status gauge: whole counts of the sweep's 4 trials, some seen running
    counts = [(tags["status"], value) for name, tags, value in scraped
              if tags.get("sweep") == study and name == "ray_" + METRIC_PREFIX + TRIALS_METRIC]
    assert {status for status, _ in counts} <= set(STATUSES)
    assert all(float(value).is_integer() and 0 <= value <= 4 for _, value in counts)
    assert any(status == "running" and value >= 1 for status, value in counts)
    reported: dict[str, list[dict[str, str]]] = {}
    for trial_dir in sorted((out_dir / "trials").iterdir()):
        with (trial_dir / "epochs.csv").open() as f:
            reported[trial_dir.name] = list(csv.DictReader(f))
    assert {tags["trial"] for _, tags, _ in ours} <= set(reported)
    assert len({tags["trial"] for _, tags, _ in ours}) >= 2
    for name, tags, value in ours:
        key = name.removeprefix("ray_" + METRIC_PREFIX)
        values = {float(row[key]) for row in reported[tags["trial"]]}
        assert any(abs(value - v) <= 1e-6 * max(1.0, abs(v)) for v in values), (name, tags, value, values)


def test_prometheus_scrapes_every_node_ray_lists(cluster, prometheus, job):
    # Ray's service discovery names both nodes' metrics ports (at the machine's address)
    scraped_ports = {urllib.parse.urlsplit(f"//{t['labels']['instance']}").port for t in prometheus_targets(prometheus)}
    assert {urllib.parse.urlsplit(url).port for url in cluster.metrics_urls} <= scraped_ports
    status, body = dashboard_get(cluster, "/api/prometheus_health", token=cluster.token)
    assert status == 200, body  # the dashboard's Metrics tab reaches it


def test_prometheus_holds_each_trials_epochs_as_the_trial_wrote_them(prometheus, job):
    _, out_dir, _ = job
    study = json.loads((out_dir / "sweep.json").read_text())["study"]
    keys = ("epoch", "au", "kl_raw", "recon_mu")
    # trial -> key -> scrape time -> value: every raw sample Prometheus stored during the job
    stored: dict[str, dict[str, dict[float, float]]] = {}
    for key in keys:
        query = f'ray_{METRIC_PREFIX}{key}{{sweep="{study}"}}[1h]'
        for series in prometheus_get(prometheus, "/api/v1/query", query=query)["result"]:
            samples = stored.setdefault(series["metric"]["trial"], {}).setdefault(key, {})
            samples.update({float(t): float(v) for t, v in series["values"]})
    written = {}
    for trial_dir in sorted((out_dir / "trials").iterdir()):
        with (trial_dir / "epochs.csv").open() as f:
            written[trial_dir.name] = {int(row["epoch"]): row for row in csv.DictReader(f)}
    assert set(stored) == set(written)
    for trial, samples in stored.items():
        rows = written[trial]
        # one scrape reads all of a trial's gauges at once: each scrape's values are one epoch's row
        for scraped_at, epoch in samples["epoch"].items():
            row = rows[int(epoch)]
            for key in keys[1:]:
                assert samples[key][scraped_at] == pytest.approx(float(row[key]), rel=1e-6), (trial, epoch, key)
        assert max(samples["epoch"].values()) == max(rows), trial  # through the last epoch
    assert sum(len(set(samples["epoch"].values())) for samples in stored.values()) > len(stored)


def test_tune_writes_tensorboard_events(job):
    _, out_dir, _ = job
    assert len(list((out_dir / "tune").glob("*/*/events.out.tfevents.*"))) == 4


def test_trackers_hold_every_trial(job):
    import mlflow

    _, out_dir, _ = job
    study = json.loads((out_dir / "sweep.json").read_text())["study"]
    assert len(list((out_dir / "wandb").glob("offline-run-*"))) == 4
    mlflow.set_tracking_uri(f"sqlite:///{out_dir / MLFLOW_DB}")
    runs = mlflow.search_runs(experiment_names=[study])
    assert len(runs) == 4
    last_au = sorted(runs["metrics.au"].tolist())
    with (out_dir / "trials.csv").open() as f:
        assert last_au == sorted(float(row["final/au"]) for row in csv.DictReader(f))


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    monkeypatch.setitem(TRACKERS, "wandb", "wandb_is_not_installed")
    with pytest.raises(ConfigError, match=r"--log wandb needs the wandb_is_not_installed package: pip install"):
        check_trackers(["wandb"])


# --------------------------------------------------------------------------- concurrency

# Run as a driver of the cluster (a process of its own: Ray reads the token settings once per process).
CONCURRENCY_SCRIPT = """
import json, sys
import ray
from sweeps.service import trial_concurrency
from sweeps.spec import ResourcesSpec
from trainables import ResourceError

ray.init(address=sys.argv[1], logging_level="warning", log_to_driver=False)
answers = []
for resources, joined in json.loads(sys.stdin.read()):
    try:
        answers.append(trial_concurrency(ResourcesSpec(**resources), joined=joined))
    except ResourceError as err:
        answers.append(str(err))
print(json.dumps(answers))
"""
CASES = [  # (resources, joined the cluster), trials at once on two one-CPU nodes
    (({}, True), 2),
    (({"max_concurrent": 5}, True), 5),  # an autoscaling cluster grows to hold them
    (({"max_concurrent": 5}, False), 2),  # a local instance never grows: only a cap
    (({"max_concurrent": 1}, False), 1),
    (({"gpus_per_trial": 1, "max_concurrent": 3}, True), 3),  # no GPU node yet: waits for the autoscaler
    (({"gpus_per_trial": 1}, True), "GPU"),  # ... but without a concurrency it is refused
]


def test_trial_concurrency_from_the_live_nodes_or_the_cap(cluster):
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENCY_SCRIPT, cluster.gcs_address], input=json.dumps([c for c, _ in CASES]),
        env={**cluster.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    answers = json.loads(lines[-1])
    for (case, expected), answer in zip(CASES, answers):
        if isinstance(expected, str):
            assert isinstance(answer, str) and expected in answer, (case, answer)
        else:
            assert answer == expected, case
    assert any("wait for the autoscaler" in line for line in lines[:-1])
