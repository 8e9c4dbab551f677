"""The ``collapse-sweep`` command dispatches to each command line, as installed by ``pip install -e .``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.console import COMMANDS, main

SCRIPT = Path(sys.executable).with_name("collapse-sweep")


def test_the_installed_command_runs_a_subcommand(tmp_path):
    """A real process through the console script: the data check of an empty folder is bad input."""
    (tmp_path / "empty").mkdir()
    done = subprocess.run([str(SCRIPT), "data", "check", str(tmp_path / "empty")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "no subjects found" in done.stdout + done.stderr, done


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: collapse-sweep {name}")


def test_no_or_an_unknown_subcommand_is_exit_2(capsys):
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["sweep"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown command 'sweep'" in line and "run" in line
