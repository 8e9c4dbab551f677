"""Bad input through the command lines, as a user meets it, with real files.

Every case runs ``python sweeps/run.py``, ``python -m trainables.single_run`` or
``python -m vae.data check|prepare`` on one broken input: bad NIfTI data,
a broken experiment or sweep YAML (a ``!!python`` tag among them), a wrong value, a storage
URL that cannot be opened, a results folder that cannot be written. Each must end with exit
status 2 and one line on stderr naming the file or key and what to do, no traceback, Ray
never started (its temp folder holds no session), nothing executed from the YAML, and
nothing written: no run folder, no cache file, no study. ``check`` is a report: its problem
goes to stdout, one line, and stderr says how many there were.

Every data class goes through both ``vae.data`` commands and one of the two training
commands (both run the same check before any compute). The fast tier calls each command's
``main()`` in this process, with ``ray.init`` made to fail the test; the system tier runs every
case as a real subprocess, four at a time, each in a folder of its own with its own Ray folder
and data cache (Ray must leave no session there). A folder the command may not write needs a
user it binds: those cases run as subprocesses only.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import pytest

from helpers import BAD_INPUTS, MINIMAL, make_bad, modality_path, ray_folder, truncate, write_subject, write_yaml

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "sweeps" / "run.py")]
TRAIN = [sys.executable, "-m", "trainables.single_run"]
DATA = [sys.executable, "-m", "vae.data"]
EXPERIMENT = ["exp1_baseline_vae", "data.size=16", "model.depth=2"]  # a valid small experiment and its overrides
# The data classes of test_data_pipeline (but duplicate ids, where two folders are to blame) and two more.
DATA_KINDS = {kind: words for kind, words in BAD_INPUTS.items() if kind != "duplicate"} | {
    "truncated nii": "cannot read the file", "empty directory": "no subjects found",
}
THROUGH_SWEEP = {"truncated gzip", "not NIfTI", "missing modality", "NaN/Inf", "empty directory", "shape"}
PYTHON_TAG = "!!python/object/apply:os.system [touch {marker}]"
MARKER = "executed"  # the file a !!python tag would create
PROGRESS_BAR = re.compile(r"^\s*(check|prepare):\s+\d+%\|")
# Where file permissions bind: any user but root, and root in a user namespace of its own.
CAN_LOCK = os.geteuid() != 0 or shutil.which("unshare") is not None
DB_DRIVER = "cannot connect" if find_spec("psycopg") or find_spec("psycopg2") else "driver is missing"


@dataclass
class Case:
    """One command on one broken input and the words its error line must hold."""

    command: list[str]
    words: list[str]
    report: bool = False  # vae.data check: the problem on stdout, a count on stderr
    locked: bool = False  # needs a folder it cannot write (a subprocess of another user)
    maps_missing: bool = False  # needs the MNI maps gone (patched, so in this process only)


Builder = Callable[[Path], Case]  # writes a case's inputs into its folder


def with_marker(content: dict | str, folder: Path) -> dict | str:
    """``content`` with ``{marker}`` replaced by the file a ``!!python`` tag would create in ``folder``."""
    return content.replace("{marker}", str(folder / MARKER)) if isinstance(content, str) else content


def locked_folder(parent: Path) -> Path:
    """A folder nobody but root may write in."""
    folder = parent / "locked"
    folder.mkdir(mode=0o555)
    return folder


def broken_data(kind: str, root: Path) -> Path:
    """A NIfTI tree under ``root`` whose one problem is ``kind``; returns the file (or folder) to blame."""
    if kind == "empty directory":
        root.mkdir(parents=True)
        return root
    if kind == "truncated nii":
        write_subject(root, "good", seed=9, ext=".nii")
        return truncate(modality_path(write_subject(root, "bad", ext=".nii"), "t2f", ext=".nii"))
    return make_bad(kind, root)


def data_case(cli: str, kind: str) -> Builder:
    def build(folder: Path) -> Case:
        blamed, data, results = broken_data(kind, folder / "data"), str(folder / "data"), str(folder / "results")
        command = {
            "check": DATA + ["check", data],
            "prepare": DATA + ["prepare", data, "--out", str(folder / "cache"), "--size", "16"],
            "sweep": SWEEP + [str(write_yaml(folder / "sweep.yaml", MINIMAL)), "--data", data, "--results", results],
            "train": TRAIN + EXPERIMENT + ["--data", data, "--results", results],
        }[cli]
        return Case(command, [str(blamed), DATA_KINDS[kind]], report=cli == "check")

    return build


def sweep_file_case(content: dict | str, *words: str) -> Builder:
    def build(folder: Path) -> Case:
        path = write_yaml(folder / "sweep.yaml", with_marker(content, folder))
        return Case(SWEEP + [str(path), "--results", str(folder / "results")], [str(path), *words])

    return build


def experiment_case(config: str | None, overrides: list[str], *words: str) -> Builder:
    """``config``: a YAML text written to a file, or None for the valid experiment."""
    def build(folder: Path) -> Case:
        named = [] if config is None else [str(write_yaml(folder / "experiment.yaml", with_marker(config, folder)))]
        command = TRAIN + (named or EXPERIMENT[:1]) + EXPERIMENT[1:] + overrides
        return Case(command + ["--results", str(folder / "results")], named + list(words))

    return build


def storage_case(url: str, *words: str) -> Builder:
    """``url`` may name ``{folder}`` (the case's) and ``{locked}`` (a folder it cannot write)."""
    def build(folder: Path) -> Case:
        locked = "{locked}" in url
        url_here = url.format(folder=folder, locked=locked_folder(folder) if locked else "")
        command = SWEEP + [str(write_yaml(folder / "sweep.yaml", MINIMAL)), "--storage", url_here,
                           "--results", str(folder / "results")]
        return Case(command, ["--storage", *words], locked=locked)

    return build


def results_case(cli: str, under: str) -> Builder:
    """``--results`` below a file (``under="file"``) or in a folder it cannot write (``"locked"``)."""
    def build(folder: Path) -> Case:
        if under == "file":
            parent, words = folder / "file", ["is a file, not a folder"]
            parent.write_text("not a folder")
        else:
            parent, words = locked_folder(folder), ["cannot write in", "Permission denied"]
        config = [str(write_yaml(folder / "sweep.yaml", MINIMAL))] if cli == "sweep" else EXPERIMENT
        command = (SWEEP if cli == "sweep" else TRAIN) + config + ["--results", str(parent / "results")]
        return Case(command, ["--results", str(parent), *words], locked=under == "locked")

    return build


def prepare_flags_case(args: list[str], *words: str) -> Builder:
    def build(folder: Path) -> Case:
        write_subject(folder / "data", "good")
        return Case(DATA + ["prepare", str(folder / "data"), "--out", str(folder / "cache"), *args], list(words))

    return build


def closed_port() -> int:
    """A local TCP port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing_mni_case(cli: str) -> Builder:
    """The phantom's MNI maps are gone (the package that ships them missing): in-process only."""
    def build(folder: Path) -> Case:
        config = [str(write_yaml(folder / "sweep.yaml", MINIMAL))] if cli == "sweep" else EXPERIMENT
        command = (SWEEP if cli == "sweep" else TRAIN) + config + ["--results", str(folder / "results")]
        return Case(command, ["data.phantom.anatomy 'mni'", "nilearn", "./setup.sh", "anatomy=procedural"],
                    maps_missing=True)

    return build


PORT = closed_port()
CASES: dict[str, Builder] = {
    **{f"{cli}: {kind}": data_case(cli, kind) for kind in DATA_KINDS
       for cli in ("check", "prepare", "sweep" if kind in THROUGH_SWEEP else "train")},
    "sweep: YAML syntax error": sweep_file_case("space: [unclosed\n", "YAML syntax error"),
    "sweep: unknown key": sweep_file_case({**MINIMAL, "budget": {"num_sample": 2}}, "budget.num_sample: unknown key"),
    "sweep: wrong value type": sweep_file_case({**MINIMAL, "budget": {"num_samples": "many"}},
                                               "budget.num_samples", "valid integer"),
    "sweep: out-of-range value": sweep_file_case({**MINIMAL, "budget": {"num_samples": 0}},
                                                 "budget.num_samples", "greater than or equal to 1"),
    "sweep: python tag": sweep_file_case(f"experiment: {PYTHON_TAG}\n", "could not determine a constructor",
                                         "python/object/apply:os.system"),
    "sweep: unknown sweep name": lambda folder: Case(
        SWEEP + ["no_such_sweep", "--results", str(folder / "results")], ["unknown sweep 'no_such_sweep'", "dip_sbd"]),
    "sweep: storage in a missing folder": storage_case("sqlite:///{folder}/missing/study.db", "missing",
                                                       "does not exist"),
    "sweep: storage in a read-only folder": storage_case("sqlite:///{locked}/study.db", "cannot write in", "locked"),
    "sweep: storage of an unknown database": storage_case("nosuchdb://host/db", "unknown database 'nosuchdb'"),
    "sweep: storage where nothing listens": storage_case(
        f"postgresql://user:secret@127.0.0.1:{PORT}/db", f"postgresql://user:***@127.0.0.1:{PORT}/db", DB_DRIVER),
    "sweep: results under a file": results_case("sweep", "file"),
    "sweep: results in a read-only folder": results_case("sweep", "locked"),
    "train: results under a file": results_case("train", "file"),
    "train: YAML syntax error": experiment_case("model:\n  z_dim: [1, 2\n", [], "YAML syntax error"),
    "train: unknown key": experiment_case("base: exp1_baseline_vae\nmodel: {zdim: 3}\n", [], "model.zdim: unknown key"),
    "train: wrong value type": experiment_case(None, ["model.z_dim=abc"], "model.z_dim", "valid integer"),
    "train: out-of-range value": experiment_case(None, ["optim.lr=-1"], "optim.lr", "greater than 0"),
    "train: unknown experiment": lambda folder: Case(
        TRAIN + ["no_such_experiment", "--results", str(folder / "results")],
        ["unknown experiment 'no_such_experiment'", "exp1_baseline_vae"]),
    "train: python tag": experiment_case(f"name: {PYTHON_TAG}\n", [], "could not determine a constructor",
                                         "python/object/apply:os.system"),
    "prepare: wrong value type": prepare_flags_case(["--size", "abc"], "--size", "invalid int value: 'abc'"),
    "prepare: out-of-range value": prepare_flags_case(["--size", "1"], "size must be an integer >= 2, got 1"),
    "prepare: unknown modality": prepare_flags_case(["--size", "16", "--modalities", "t1c", "t3"],
                                                    "unknown modality 't3'"),
    "sweep: phantom maps missing": missing_mni_case("sweep"),
    "train: phantom maps missing": missing_mni_case("train"),
}


@dataclass
class Outcome:
    case: Case
    folder: Path
    ray_dir: Path | None  # the subprocess's Ray folder (None in this process: ray.init fails the test)
    result: subprocess.CompletedProcess
    seconds: float


def run_case(name: str, base: Path) -> Outcome:
    """Build and run case ``name`` in ``base/<name>`` as a subprocess with its own Ray folder and data cache."""
    folder = base / re.sub(r"\W+", "_", name).strip("_")
    folder.mkdir(parents=True)
    case = CASES[name](folder)
    ray_env = ray_folder()
    env = {**os.environ, **ray_env, "COLLAPSE_SWEEP_CACHE": str(folder / "cache-root")}
    # As root, a user namespace of its own makes the process "nobody" there, so mode 0o555 binds.
    command = ["unshare", "--user", *case.command] if case.locked and os.geteuid() == 0 else case.command
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(case, folder, Path(ray_env["RAY_TMPDIR"]), result, time.perf_counter() - began)


def in_process_main(command: list[str]):
    """The ``main(argv)`` a command line runs, and its arguments."""
    import sweeps.run
    import trainables.single_run
    import vae.data.__main__

    for prefix, module in ((SWEEP, sweeps.run), (TRAIN, trainables.single_run), (DATA, vae.data.__main__)):
        if command[: len(prefix)] == prefix:
            return module.main, command[len(prefix):]
    raise AssertionError(command)


def check_outcome(outcome: Outcome) -> None:
    """Exit 2, one line naming the file or key, no traceback, nothing started, written or executed."""
    result, case = outcome.result, outcome.case
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout
    errors = message_lines(result.stderr)
    assert len(errors) == 1, errors
    if case.report:  # the problem on stdout, one line, naming the file; the count on stderr
        problems = message_lines(result.stdout)
        assert len(problems) == 1 and errors == [f"1 problem(s) under {case.command[-1]}"], (problems, errors)
        line = problems[0]
    else:
        line = errors[0]
    for words in case.words:
        assert words in line, (words, line)
    assert "secret" not in result.stderr  # a database password is never printed
    if outcome.ray_dir is not None:
        assert not list(outcome.ray_dir.rglob("session_*")), "Ray was started"
    assert left_behind(outcome.folder) == []
    assert not (outcome.folder / MARKER).exists()  # a !!python tag ran nothing


@pytest.fixture(scope="module")
def outcomes(scratch):
    names = [name for name in CASES if (CAN_LOCK or "read-only" not in name) and "maps missing" not in name]
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(names, pool.map(lambda name: run_case(name, scratch / "bad-input"), names)))
    slowest = max(done, key=lambda name: done[name].seconds)
    print(f"\n{len(done)} bad-input commands, 4 at a time: {time.perf_counter() - began:.0f} s; "
          f"slowest {done[slowest].seconds:.1f} s ({slowest})")
    yield done
    for outcome in done.values():
        shutil.rmtree(outcome.ray_dir, ignore_errors=True)


def message_lines(text: str) -> list[str]:
    """The lines of ``text``, progress bars left out."""
    return [line for line in text.splitlines() if line.strip() and "\r" not in line and not PROGRESS_BAR.match(line)]


def left_behind(folder: Path) -> list[Path]:
    """What a command wrote into its folder: a run folder, a cache, a study (its inputs do not count)."""
    written = [folder / name for name in ("results", "cache") if (folder / name).exists()]
    written += [p for p in (folder / "cache-root").rglob("*") if p.is_file() and p.name != ".lock"]
    return written + list(folder.rglob("*.db")) + list(folder.rglob("*/locked/*"))


@pytest.mark.parametrize("name", [name for name in CASES if "read-only" not in name])
def test_bad_input_through_each_main_is_one_line_exit_2(name, tmp_path, monkeypatch, capsys, no_ray):
    folder = tmp_path / "case"
    folder.mkdir()
    case = CASES[name](folder)
    monkeypatch.setenv("COLLAPSE_SWEEP_CACHE", str(folder / "cache-root"))
    if case.maps_missing:
        monkeypatch.setattr("vae.data.phantom.anatomy.mni_template_paths", lambda: None)
    main, argv = in_process_main(case.command)
    began = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors, as the command line ends them
        code = exit_.code
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess(case.command, code, captured.out, captured.err)
    check_outcome(Outcome(case, folder, None, result, time.perf_counter() - began))


@pytest.mark.system
@pytest.mark.parametrize("name", [name for name in CASES if "maps missing" not in name])
def test_bad_input_is_one_line_exit_2_before_anything_starts(outcomes, name):
    if name not in outcomes:
        pytest.skip("root without unshare: no folder is read-only to it")
    check_outcome(outcomes[name])
