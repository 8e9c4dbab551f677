"""Find BraTS-style subjects on disk: a directory tree or a CSV manifest.

Two directory layouts are recognised, in any mix and at any depth:

* BraTS 2020/2021: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]``
* BraTS 2023:      ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii[.gz]``

Modalities carry their BraTS 2023 names everywhere (t1c, t1n, t2f, t2w); the 2021 names
are aliases. A CSV manifest has a ``subject`` column, one column per modality (either
naming) and an optional ``seg`` column, with paths relative to the CSV file.
"""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

MODALITIES: tuple[str, ...] = ("t1c", "t1n", "t2f", "t2w")
ALIASES: dict[str, str] = {"t1ce": "t1c", "t1": "t1n", "flair": "t2f", "t2": "t2w"}
SEG = "seg"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# "<case><_ or -><suffix>.nii[.gz]"; the greedy case part makes the last separator split.
_FILE_NAME = re.compile(r"^(?P<case>.+)[_-](?P<suffix>[A-Za-z0-9]+)\.nii(\.gz)?$")
# Subject ids become cache file names, so they must be safe as one.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DataError(ValueError):
    """Bad input data; the message names the offending file or subject and what to do."""

    def __init__(self, reason: str, path: Path | str | None = None):
        self.reason, self.path = reason, path
        super().__init__(f"{path}: {reason}" if path is not None else reason)

    def __reduce__(self):  # keep ``path`` and ``reason`` when sent back from a worker process
        return type(self), (self.reason, self.path)


@dataclass(frozen=True)
class Subject:
    """One case: a NIfTI path per (canonical) modality and an optional segmentation."""

    id: str
    paths: dict[str, Path]
    seg: Path | None = None

    def files(self) -> dict[str, Path]:
        """Every file of the subject, keyed by modality name or ``"seg"``."""
        return {**self.paths, **({SEG: self.seg} if self.seg is not None else {})}

    @property
    def directory(self) -> Path:
        """The folder of the subject's files (of the first one, should they be spread out)."""
        return next(iter(self.files().values())).parent


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, tied to a file (and to a subject when there is one)."""

    path: Path
    message: str
    subject: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def canonical_modality(name: str) -> str:
    """``"t1ce"`` -> ``"t1c"``; canonical names pass through; anything else raises."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODALITIES:
        known = ", ".join(MODALITIES + tuple(ALIASES))
        raise DataError(f"unknown modality '{name}': use one of {known}")
    return key


def canonical_modalities(names: Iterable[str]) -> tuple[str, ...]:
    """Canonical names in the given order; an empty list or a repeated modality raises."""
    out = tuple(canonical_modality(n) for n in names)
    if not out:
        raise DataError("no modalities given: name at least one of " + ", ".join(MODALITIES))
    repeated = sorted({m for m in out if out.count(m) > 1})
    if repeated:
        raise DataError(f"modality {', '.join(repeated)} given twice (aliases count as the same modality)")
    return out


def discover(root: str | Path, modalities: Sequence[str] = MODALITIES, require_seg: bool = False) -> list[Subject]:
    """The subjects under ``root`` (a directory or a ``.csv`` manifest), sorted by id.

    Raises :class:`DataError` listing every discovery problem (missing modality, duplicate
    id, nothing found); use :func:`scan` to get the problems as data instead.
    """
    subjects, problems = scan(root, modalities, require_seg)
    if problems:
        raise DataError("\n".join(str(p) for p in problems))
    return subjects


def scan(
    root: str | Path, modalities: Sequence[str] = MODALITIES, require_seg: bool = False
) -> tuple[list[Subject], list[Problem]]:
    """Every subject found, sorted by id, and the discovery problems.

    A subject named in a problem (``problem.subject``) may lack modalities or share its id;
    its ``paths`` hold only the files that exist, so they can still be checked.
    """
    root = Path(root)
    modalities = canonical_modalities(modalities)
    if not root.exists():
        return [], [Problem(root, "no such file or directory")]
    if root.is_file():
        if root.suffix.lower() != ".csv":
            return [], [Problem(root, "expected a directory of BraTS cases or a .csv manifest")]
        found, problems = _scan_csv(root, modalities)
    else:
        found, problems = _scan_tree(root, modalities)
    subjects, more = _subjects(found, modalities, require_seg)
    problems += more
    if not subjects and not problems:
        problems.append(Problem(root, _NOTHING_FOUND))
    return subjects, problems


_NOTHING_FOUND = (
    "no subjects found; expected <case>/<case>_{t1,t1ce,t2,flair}.nii.gz (BraTS 2021), "
    "<case>/<case>-{t1n,t1c,t2w,t2f}.nii.gz (BraTS 2023) or a CSV manifest"
)


def split_nifti_name(name: str) -> tuple[str, str] | None:
    """``"BraTS2021_00000_t1ce.nii.gz"`` -> ``("BraTS2021_00000", "t1c")``; ``None`` if not BraTS-named."""
    match = _FILE_NAME.match(name)
    if not match:
        return None
    suffix = match["suffix"].lower()
    suffix = ALIASES.get(suffix, suffix)
    if suffix not in MODALITIES and suffix != SEG:
        return None
    return match["case"], suffix


def _scan_tree(root: Path, modalities: tuple[str, ...]) -> tuple[list[tuple[str, Path, dict]], list[Problem]]:
    """(case id, case directory, {modality or seg: path}) for every BraTS-named file group."""
    groups: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    problems = []
    for path in sorted(root.rglob("*.nii*")):
        parsed = split_nifti_name(path.name) if path.is_file() else None
        if parsed is None or (parsed[1] != SEG and parsed[1] not in modalities):
            continue
        case, kind = parsed
        files = groups[(path.parent, case)]
        if kind in files:
            message = f"second file for {kind} of subject {case} (also {files[kind].name}); keep one"
            problems.append(Problem(path, message, subject=case))
            continue
        files[kind] = path
    return [(case, directory, files) for (directory, case), files in groups.items()], problems


def _scan_csv(csv_path: Path, modalities: tuple[str, ...]) -> tuple[list[tuple[str, Path, dict]], list[Problem]]:
    try:
        with csv_path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return [], [Problem(csv_path, f"cannot read the CSV manifest ({err})")]
    if not rows:
        return [], [Problem(csv_path, "empty CSV manifest; expected a header subject,t1c,t1n,t2f,t2w[,seg]")]
    header = [h.strip().lower() for h in rows[0]]
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        kind = ALIASES.get(name, name)
        if kind in modalities + (SEG, "subject"):
            columns[kind] = index
    missing = [m for m in ("subject",) + modalities if m not in columns]
    if missing:
        return [], [Problem(csv_path, f"no column for {', '.join(missing)} in the header ({','.join(rows[0])})")]
    found = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {kind: row[i].strip() if i < len(row) else "" for kind, i in columns.items()}
        files = {kind: _csv_path(csv_path, cell) for kind, cell in cells.items() if kind != "subject" and cell}
        found.append((cells["subject"] or f"<line {line}>", csv_path, files))
    return found, []


def _csv_path(csv_path: Path, cell: str) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else csv_path.parent / path


def _subjects(
    found: list[tuple[str, Path, dict]], modalities: tuple[str, ...], require_seg: bool
) -> tuple[list[Subject], list[Problem]]:
    """A subject per file group, and problems for missing files and ids not unique or not file-name-safe."""
    by_id: dict[str, list[Path]] = defaultdict(list)
    for case, where, _ in found:
        by_id[case].append(where)
    subjects, problems = [], []
    for case, where, files in sorted(found, key=lambda item: (item[0], str(item[1]))):
        bad = []  # (path, message)
        if len(by_id[case]) > 1:
            others = ", ".join(str(p) for p in by_id[case] if p != where) or "another row"
            bad.append((where, f"duplicate subject id {case} (also in {others}); rename or remove one"))
        if not _SAFE_ID.match(case):
            bad.append((where, f"subject id '{case}' cannot name a file; use letters, digits, '.', '_' or '-'"))
        for modality in modalities:
            if modality not in files:
                bad.append((where, f"subject {case} is missing modality {modality} ({_expected(where, modality)})"))
        if require_seg and SEG not in files:
            bad.append((where, f"subject {case} has no segmentation ({_expected(where, SEG)})"))
        for path in files.values():
            if not path.is_file():
                bad.append((path, f"no such file (listed for subject {case} in {where})"))
        problems += [Problem(path, message, subject=case) for path, message in bad]
        paths = {m: files[m] for m in modalities if m in files and files[m].is_file()}
        seg = files.get(SEG)
        subjects.append(Subject(case, paths, seg if seg is not None and seg.is_file() else None))
    return subjects, problems


def _expected(where: Path, kind: str) -> str:
    """What would have provided ``kind``: a file name in a case folder, a cell in a manifest."""
    if where.suffix.lower() == ".csv":
        return f"its {kind} cell is empty"
    old = [alias for alias, canonical in ALIASES.items() if canonical == kind] or [kind]
    return f"expected <case>_{old[0]}.nii.gz or <case>-{kind}.nii.gz"
