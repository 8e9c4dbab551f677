"""What one trial asks the cluster for, and how many trials fit side by side.

A trial with one worker is a single Tune actor holding the worker's CPUs and GPUs
(a fraction of a GPU is allowed). A trial with more workers is a driver actor that only
waits on a Ray Train ``TorchTrainer``; the driver takes a token CPU share (Ray rejects
zero) and the workers' resources go to the trainer's own placement group, which Tune
does not see. Tune's table therefore shows only the drivers' usage, and nothing stops it
from starting more drivers than the workers can be placed for: the trainer then waits
for its workers forever. :func:`max_concurrent_trials` computes the cap to give Tune.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

# The trial driver of a multi-worker trial only waits; 0 is rejected by Ray.
DRIVER_CPU = 0.01
# Ray stores resource amounts as fixed point with four decimals.
_UNITS = 10_000


class ResourceError(ValueError):
    """A trial cannot be placed on the cluster as configured."""


@dataclass(frozen=True)
class TrialResources:
    """Workers per trial and what each of them holds.

    ``gpus_per_worker`` is used only with ``use_gpu`` and may be a fraction (several
    trials or workers then share one GPU). ``max_failures`` is how often Ray Train
    restarts a failed worker group from its last checkpoint (``workers > 1``).
    """

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {self.workers!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker!r}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures!r}")

    @classmethod
    def per_trial(cls, workers: int = 1, cpus: float = 1.0, gpus: float = 0.0, max_failures: int = 0) -> TrialResources:
        """A trial's ``cpus`` and ``gpus`` (0: CPU only) shared evenly by its ``workers``."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
        if gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {gpus!r}")
        return cls(
            workers=workers, use_gpu=gpus > 0, cpus_per_worker=cpus / workers,
            gpus_per_worker=(gpus or 1.0) / workers, max_failures=max_failures,
        )

    @property
    def worker_bundle(self) -> dict[str, float]:
        """One worker's share, in Ray's resource names."""
        bundle = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            bundle["GPU"] = float(self.gpus_per_worker)
        return bundle

    @property
    def bundles(self) -> list[dict[str, float]]:
        """Everything one trial holds: the trial actor, then (with several workers) each worker."""
        if self.workers == 1:
            return [self.worker_bundle]
        return [{"CPU": DRIVER_CPU}] + [self.worker_bundle] * self.workers

    def placement(self):
        """The trial actor's share as Tune takes it (``tune.with_resources``); Ray Train places the workers."""
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([self.bundles[0]])


def max_concurrent_trials(resources: TrialResources, nodes: Sequence[Mapping[str, float]] | None = None) -> int:
    """How many trials can hold their resources at once on ``nodes`` (default: the live Ray nodes).

    Bundles are placed first-fit, the trial actor first and then its workers, as Ray's
    PACK strategy would; a trial counts only when all of its bundles are placed.
    Raises :class:`ResourceError` when not even one trial fits, naming what it asks for.
    """
    nodes = _live_nodes() if nodes is None else list(nodes)
    capacity = [_fixed(node) for node in nodes]
    worker = _fixed(resources.worker_bundle)
    if not any(_fits(worker, node) for node in capacity):
        raise ResourceError(
            f"one worker asks for {_describe(resources.worker_bundle)} but the largest node offers "
            f"{_describe(_largest(nodes, resources.worker_bundle))}; "
            "lower cpus_per_worker/gpus_per_worker or add a bigger node"
        )
    bundles = [_fixed(bundle) for bundle in resources.bundles]
    trials = 0
    while _place_all(bundles, capacity):
        trials += 1
    if trials == 0:
        total = {key: sum(b.get(key, 0.0) for b in resources.bundles) for key in resources.worker_bundle}
        raise ResourceError(
            f"one trial ({resources.workers} workers plus its driver) asks for {_describe(total)} in all, "
            f"more than the cluster can place at once; use fewer workers or smaller shares"
        )
    return trials


def _live_nodes() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _fixed(bundle: Mapping[str, float]) -> dict[str, int]:
    return {key: round(float(value) * _UNITS) for key, value in bundle.items()}


def _fits(bundle: Mapping[str, int], node: Mapping[str, int]) -> bool:
    return all(node.get(key, 0) >= amount for key, amount in bundle.items())


def _place_all(bundles: list[dict[str, int]], capacity: list[dict[str, int]]) -> bool:
    """Take every bundle from ``capacity`` (in place) first-fit; on failure leave it unchanged."""
    taken: list[tuple[dict[str, int], dict[str, int]]] = []
    for bundle in bundles:
        node = next((n for n in capacity if _fits(bundle, n)), None)
        if node is None:
            for node, bundle in taken:
                for key, amount in bundle.items():
                    node[key] += amount
            return False
        for key, amount in bundle.items():
            node[key] -= amount
        taken.append((node, bundle))
    return True


def _largest(nodes: Sequence[Mapping[str, float]], bundle: Mapping[str, float]) -> dict[str, float]:
    """The node offering most of ``bundle``'s scarcest resource (for the error message)."""
    if not nodes:
        return {key: 0.0 for key in bundle}
    best = max(nodes, key=lambda n: min(n.get(k, 0.0) / v for k, v in bundle.items()))
    return {key: float(best.get(key, 0.0)) for key in bundle}


def _describe(bundle: Mapping[str, float]) -> str:
    return ", ".join(f"{value:g} {key}" for key, value in bundle.items())
