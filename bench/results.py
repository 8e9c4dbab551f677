"""What every benchmark shares: the machine's description and its section of ``RESULTS.md``."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Mapping

RESULTS = Path(__file__).parent / "RESULTS.md"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match[1].strip() if match else platform.machine()


def machine() -> str:
    """One line: CPU model, core count, Python and torch versions (torch only if imported)."""
    import sys

    torch = sys.modules.get("torch")
    extra = f", torch {torch.__version__}" if torch else ""
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}{extra}"


def publish(folder: Path, key: str, result: Mapping[str, Any], section: str) -> None:
    """A benchmark's figures as ``<folder>/<name>.json`` and its section of ``<folder>/RESULTS.md``, and
    the section printed; ``key`` is the benchmark's file (``bench/throughput.py``): it names the JSON
    and marks the section."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{Path(key).stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    replace_section(folder / RESULTS.name, key, section)
    print(section)


def replace_section(path: Path, key: str, section: str) -> None:
    """Put ``section`` between the ``<!-- key -->`` markers of ``path``, keeping everything else."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
