"""Preprocess once, read many times: a directory of float16 ``.npy`` cubes and a manifest.

Layout of a cache directory::

    <id>.npy        float16 C-contiguous [C, N, N, N], one per subject
    <id>.seg.npy    uint8 [N, N, N]: its segmentation in the same frame (subjects with one)
    <id>.json       the entry: params hash, source files (path, size, mtime_ns), geometry, stats,
                    and the segmentation's factors (vae.data.subject_factors)
    manifest.json   the preprocessing parameters, their hash and every entry; written last
    factors.csv     every subject's factors: the segmentation's, and those of --factors CSV

Every file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees half a file. The per-subject JSON is written after
its ``.npy``, which makes an interrupted run resumable: the next run keeps every entry whose
params hash and source files (size, mtime) still match and redoes the rest. The manifest is
removed before anything changes and rewritten at the end, so a manifest always describes
the files beside it. One writer per cache directory at a time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from vae.run_files import atomic_write, csv_bytes, is_temporary

from .checks import check_subject, map_subjects
from .discovery import DataError, Problem, Subject, scan
from .preprocess import Geometry, PreprocessParams, preprocess_subject
from .subject_factors import (
    SUBJECT_COLUMN, Factors, load_labels, merge_factors, read_factor_table, resample_labels, seg_factors,
)

MANIFEST = "manifest.json"
FACTORS_CSV = "factors.csv"
SEG_SUFFIX = ".seg.npy"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """The contents of ``manifest.json``: what every cached array is and where it came from."""

    params: PreprocessParams
    entries: dict[str, dict[str, Any]]  # subject id -> {"file", "sources", "seg", "info", "factors"}
    skipped: dict[str, list[str]] = field(default_factory=dict)  # subject id -> its problems
    root: str = ""  # the discovered source, for the record
    factors_csv: str | None = None  # the table whose factors were merged in (prepare --factors)
    reused: list[str] = field(default_factory=list, compare=False)  # this run only; not saved

    @property
    def factors(self) -> Factors:
        """Subject id -> its factors (empty for a subject without segmentation or table row)."""
        return {subject: dict(entry.get("factors") or {}) for subject, entry in self.entries.items()}

    @property
    def without_factors(self) -> list[str]:
        return [subject for subject, factors in self.factors.items() if not factors]

    @property
    def subject_ids(self) -> list[str]:
        return list(self.entries)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``[C, N, N, N]`` of every cached array."""
        return (len(self.params.modalities),) + (self.params.size,) * 3

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "root": self.root,
            "params": self.params.to_dict(),
            "params_hash": self.params.hash,
            "shape": list(self.shape),
            "dtype": "float16",
            "subjects": self.entries,
            "skipped": self.skipped,
            "factors_csv": self.factors_csv,
        }

    @classmethod
    def load(cls, cache_dir: str | Path) -> "Manifest":
        path = Path(cache_dir) / MANIFEST
        if not path.is_file():
            raise DataError(
                f"no {MANIFEST}; build the cache with `python -m vae.data prepare ROOT --out {cache_dir} --size N`",
                cache_dir,
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
            return cls(PreprocessParams.from_dict(data["params"]), data["subjects"], data["skipped"], data["root"],
                       data.get("factors_csv"))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"unreadable manifest ({err}); prepare the cache again", path) from None


def is_cache(path: str | Path) -> bool:
    """Whether ``path`` is a prepared cache directory (rather than raw NIfTI data)."""
    return (Path(path) / MANIFEST).is_file()


def prepare(
    root: str | Path,
    out: str | Path,
    params: PreprocessParams,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
    factors_csv: str | Path | None = None,
) -> Manifest:
    """Preprocess every subject under ``root`` into the cache directory ``out``; return its manifest.

    Subjects whose cache entry is current (same params hash, same source sizes and mtimes) are
    reused untouched; the others are checked (:func:`~vae.data.checks.check_subject`) and then
    preprocessed in ``workers`` processes. Any problem raises :class:`DataError` listing every
    one, before anything is written -- unless ``skip_bad``, which leaves those subjects out and
    records them under ``skipped``. ``factors_csv`` (:func:`~vae.data.subject_factors.read_factor_table`)
    adds factors to the segmentations' or overrides them; a table that names no subject of
    ``root`` is refused before anything is written.
    """
    out = Path(out)
    extra = read_factor_table(factors_csv) if factors_csv is not None else None
    subjects, todo, problems = _checked(root, out, params, workers, progress)
    _raise_unless_skippable(problems, skip_bad, "nothing was written")
    bad = {p.subject for p in problems}
    subjects, todo = ([s for s in group if s.id not in bad] for group in (subjects, todo))
    if not subjects:
        raise DataError("\n".join([str(p) for p in problems] + [f"{root}: every subject has a problem"]))
    if extra is not None:
        merge_factors({}, extra, [s.id for s in subjects], factors_csv)  # refuses a table for other data

    out.mkdir(parents=True, exist_ok=True)
    for stray in filter(is_temporary, out.iterdir()):  # left by a killed run
        stray.unlink(missing_ok=True)
    if todo:  # the manifest and the factor table would describe files about to change
        (out / MANIFEST).unlink(missing_ok=True)
        (out / FACTORS_CSV).unlink(missing_ok=True)
    results = map_subjects(partial(_build_entry, params=params, out=out), todo, workers, "prepare", progress)
    failed = [r for r in results if isinstance(r, Problem)]
    _raise_unless_skippable(failed, skip_bad, "the entries of the other subjects are kept; run again to finish")

    problems += failed
    bad |= {p.subject for p in failed}
    skipped: dict[str, list[str]] = {}
    for problem in problems:
        skipped.setdefault(problem.subject, []).append(str(problem))
    built = {s.id for s in todo}
    entries = {s.id: _entry(out, s.id) for s in subjects if s.id not in bad}
    if extra is not None:
        merged = merge_factors({i: e.get("factors") or {} for i, e in entries.items()}, extra, entries, factors_csv)
        entries = {i: {**e, "factors": merged[i]} for i, e in entries.items()}
    manifest = Manifest(
        params, entries=entries, skipped=skipped, root=str(Path(root).resolve()),
        factors_csv=None if factors_csv is None else str(Path(factors_csv).resolve()),
        reused=[s.id for s in subjects if s.id not in built],
    )
    if any(manifest.factors.values()):
        _write_if_changed(out / FACTORS_CSV, _factor_table_bytes(manifest.factors), force=bool(todo))
    _write_if_changed(out / MANIFEST, _json_bytes(manifest.to_json()), force=bool(todo))
    return manifest


def _write_if_changed(path: Path, data: bytes, force: bool) -> None:
    """Write ``data`` unless ``path`` holds it already: an up-to-date cache is left untouched."""
    if force or not path.is_file() or path.read_bytes() != data:
        atomic_write(path, data)


def _factor_table_bytes(factors: Factors) -> bytes:
    """``factors.csv``: a subject column and one column per factor name (empty where undefined)."""
    names = sorted({name for row in factors.values() for name in row})
    rows = [{SUBJECT_COLUMN: subject, **{k: repr(v) for k, v in row.items() if not math.isnan(v)}}
            for subject, row in factors.items()]
    return csv_bytes(rows, [SUBJECT_COLUMN, *names])


def check_pending(root: str | Path, out: str | Path, params: PreprocessParams) -> None:
    """Raise the :class:`DataError` that :func:`prepare` would raise before writing, writing nothing.

    Only the subjects whose cache entry in ``out`` is not current are read, as ``prepare``
    would, so checking an up-to-date cache costs a scan of the source.
    """
    _raise_unless_skippable(_checked(root, Path(out), params, 1, False)[2], False, "nothing was written")


def _checked(
    root: str | Path, out: Path, params: PreprocessParams, workers: int, progress: bool
) -> tuple[list[Subject], list[Subject], list[Problem]]:
    """Every subject, those whose cache entry must be (re)built, and the problems of the latter."""
    subjects, problems = scan(root, params.modalities)
    incomplete = {p.subject for p in problems}
    todo = [s for s in subjects if s.id in incomplete or not _entry_is_current(out, s, params.hash)]
    for found in map_subjects(check_subject, todo, workers, "check", progress):
        problems += found
    return subjects, todo, problems


def source_record(subject: Subject) -> dict[str, dict[str, Any]]:
    """``{modality or "seg": {"path", "size", "mtime_ns"}}``: what decides whether a cache entry is stale."""
    record = {}
    for modality, path in subject.files().items():
        stat = path.stat()
        record[modality] = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return record


def _build_entry(subject: Subject, params: PreprocessParams, out: Path) -> dict | Problem:
    """Preprocess one subject into ``out`` (array first, then its entry); runs in a worker."""
    sources = source_record(subject)  # before reading: a file changed meanwhile looks stale next time
    try:
        array, _, info = preprocess_subject(subject, params)
        labels = load_labels(subject.seg) if subject.seg is not None else None
    except DataError as err:
        return Problem(Path(err.path or subject.directory), err.reason, subject.id)
    atomic_write(out / f"{subject.id}.npy", lambda f: np.save(f, array, allow_pickle=False))
    entry = {
        "params_hash": params.hash,
        "sources": sources,
        "seg": str(subject.seg.resolve()) if subject.seg else None,
        "info": info,
    }
    if labels is not None:
        geometry = Geometry.from_info(info, params.size)
        cube = resample_labels(labels, geometry)
        atomic_write(out / f"{subject.id}{SEG_SUFFIX}", lambda f: np.save(f, cube, allow_pickle=False))
        entry["factors"] = seg_factors(labels, geometry)
    atomic_write(out / f"{subject.id}.json", _json_bytes(entry))
    return entry


def _entry(out: Path, subject_id: str) -> dict[str, Any]:
    """The manifest entry of a subject whose ``<id>.json`` is current."""
    entry = json.loads((out / f"{subject_id}.json").read_text())
    del entry["params_hash"]  # the manifest holds it once
    return {"file": f"{subject_id}.npy", **entry}


def _entry_is_current(out: Path, subject: Subject, params_hash: str) -> bool:
    try:
        entry = json.loads((out / f"{subject.id}.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        entry.get("params_hash") == params_hash
        and entry.get("sources") == source_record(subject)
        and (out / f"{subject.id}.npy").is_file()
    )


def _raise_unless_skippable(problems: list[Problem], skip_bad: bool, consequence: str) -> None:
    """Raise on any problem, or only on those tied to no subject when bad subjects may be skipped."""
    fatal = [p for p in problems if p.subject is None] if skip_bad else problems
    if fatal:
        hint = "" if skip_bad else " (or pass --skip-bad to leave the bad subjects out)"
        if len(fatal) == 1:  # one line: the file, its problem, the consequence
            raise DataError(f"{fatal[0].message}; {consequence}{hint}", fatal[0].path)
        raise DataError("\n".join([str(p) for p in fatal] + [f"{len(fatal)} problem(s); {consequence}{hint}"]))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()
