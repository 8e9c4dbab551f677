"""Security: nothing a file or a configuration holds gets executed.

* A checkpoint carrying a pickled call (here ``os.system``, creating a marker file) is
  refused by the weights-only loader, whether loaded directly or found by a resumed run,
  and the call never runs; the same file loaded the unsafe way does run it, so the payload is real.
* The project's Python never builds a shell from strings: a static scan of every module of
  ``vae``, ``trainables``, ``sweeps`` and ``bench`` finds no ``shell=True``, ``os.system``,
  ``os.popen``, ``eval``, ``exec``, subprocess call on a command line built as text, unsafe YAML or
  pickle loading, or ``torch.load`` without ``weights_only=True``; the scanner is shown to
  catch each of these in a sample.

A ``!!python/object/apply`` tag in a sweep or experiment YAML is refused with one line and
exit status 2, executing nothing: ``test_reliability_input.py`` (cases "python tag"). The
cluster configurations keep the dashboard on localhost with token auth:
``test_cluster.py::test_every_ray_start_is_authenticated_and_the_dashboard_local``.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from vae.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE, load_checkpoint
from vae.config import load_experiment
from vae.training import fit

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vae", "trainables", "sweeps", "bench")
SHELLS = {"os.system", "os.popen", "eval", "exec"}
UNSAFE_LOADS = {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads"}


class Payload:
    """Unpickled, it runs ``touch marker``: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tampered_checkpoint(run_dir: Path, marker: Path) -> Path:
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 1, "extra": Payload(marker)}, folder / CHECKPOINT_FILE)
    return folder


def test_the_payload_is_live(tmp_path):
    folder = tampered_checkpoint(tmp_path, tmp_path / "ran")
    torch.load(folder / CHECKPOINT_FILE, weights_only=False)  # what the project never does
    assert (tmp_path / "ran").exists()


def test_a_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    folder = tampered_checkpoint(tmp_path, marker)
    with pytest.raises(ValueError, match=f"{folder / CHECKPOINT_FILE}: refused by the weights-only loader"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_a_run_resuming_from_a_tampered_checkpoint_stops_before_it_runs(tmp_path):
    """``fit`` finds the checkpoint in its run directory, as a re-run or a retried trial does."""
    marker = tmp_path / "ran"
    tampered_checkpoint(tmp_path / "run", marker)
    cfg = load_experiment("exp1_baseline_vae", ["data.size=16", "model.depth=2", "data.modalities=[t1c]"])
    volumes = [torch.zeros(1, 16, 16, 16)] * 2
    with pytest.raises(ValueError, match="refused by the weights-only loader"):
        fit(cfg, volumes, volumes, tmp_path / "run", device=torch.device("cpu"))
    assert not marker.exists()


# --------------------------------------------------------------------------- static scan


def qualified_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> module path, from the module's imports (``from os import system`` -> os.system)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.asname or alias.name: alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names}
    return names


def called(func: ast.expr, names: dict[str, str]) -> str:
    """The dotted name of a call's target, imports resolved (``sp.run`` -> ``subprocess.run``)."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    return ".".join([names.get(func.id, func.id), *reversed(parts)])


def builds_a_string(node: ast.expr) -> bool:
    """A string literal, f-string, concatenation, ``%`` or ``.format``/``.join`` call: a command line as text."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.BinOp):
        return builds_a_string(node.left) or builds_a_string(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("format", "join")
    return isinstance(node, ast.JoinedStr)


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value for k in call.keywords)


def findings(source: str, filename: str) -> list[str]:
    """Every call in ``source`` that could execute a string or untrusted data, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    names = qualified_names(tree)
    found = []
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        name, where = called(call.func, names), f"{filename}:{call.lineno}"
        if name in SHELLS or name.startswith(("os.exec", "os.spawn")):
            found.append(f"{where}: {name}")
        if keyword_is(call, "shell", True):
            found.append(f"{where}: shell=True")
        if name.startswith("subprocess.") and call.args and builds_a_string(call.args[0]):
            found.append(f"{where}: {name} of a command line built as text")
        if name in UNSAFE_LOADS:
            found.append(f"{where}: {name}")
        if name == "torch.load" and not keyword_is(call, "weights_only", True):
            found.append(f"{where}: torch.load without weights_only=True")
        if name == "numpy.load" and keyword_is(call, "allow_pickle", True):
            found.append(f"{where}: numpy.load with allow_pickle=True")
    return found


def test_the_scanner_catches_each_unsafe_call():
    sample = "\n".join([
        "import os, subprocess as sp, yaml, torch, pickle, numpy as np",
        "from os import system",
        "os.system(cmd)", "system(cmd)", "os.popen(cmd)", "eval(text)", "exec(text)", "os.execvp('sh', args)",
        "sp.run(cmd, shell=True)", "sp.Popen(f'ray start {x}')", "sp.check_output('ls ' + d)",
        "sp.call(' '.join(parts))",
        "yaml.load(text)", "yaml.unsafe_load(text)", "pickle.loads(blob)", "torch.load(path)",
        "torch.load(path, weights_only=False)", "np.load(path, allow_pickle=True)",
        "sp.run(['ray', 'start'], check=True)", "sp.run(command)", "yaml.safe_load(text)",
        "torch.load(p, weights_only=True)", "np.load(path)",
    ])
    found = findings(sample, "sample.py")
    assert [int(f.split(":")[1]) for f in found] == list(range(3, 19)), found  # each unsafe line once, no safe one


def test_no_project_module_executes_strings_or_untrusted_data():
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 40  # the whole project, not an empty glob
    found = [f for path in files for f in findings(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


def test_a_storage_password_is_not_recorded_with_the_command():
    from sweeps.service import _masked_command

    argv = ["sweeps/run.py", "dip_sbd", "--storage", "postgresql+psycopg://lab:s3cret@db.example:5432/sweeps"]
    recorded = _masked_command(argv)
    assert "s3cret" not in " ".join(recorded) and recorded[:3] == argv[:3]
    assert recorded[3] == "postgresql+psycopg://lab:***@db.example:5432/sweeps"
