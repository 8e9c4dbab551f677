"""The project's layout: one name per module, the layers in one direction, and a README table that
names every package and module with who imports it, checked against the tree and the imports."""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from helpers import REPO

PACKAGES = ("vae", "trainables", "sweeps", "bench")  # in layer order: each imports only those before it
ROW = re.compile(r"^\|\s*`(?P<path>[^`]+)`\s*\|(?P<what>[^|]+)\|(?P<importers>[^|]+)\|\s*$")


def python_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def table_path(module: str) -> str:
    """``vae.training`` -> ``vae/training.py``; a package -> its folder, ``vae/models/``."""
    path = REPO / Path(*module.split("."))
    return f"{module.replace('.', '/')}/" if path.is_dir() else f"{module.replace('.', '/')}.py"


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (relative imports resolved; ``from a import b`` counts ``a.b``
    when ``a.b`` is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found


def importers() -> dict[str, set[str]]:
    """For every project module, the top-level packages whose other modules import it."""
    files = {module_name(p): p for p in python_files()}
    out: dict[str, set[str]] = {module: set() for module in files}
    for module, path in files.items():
        for target in imported_modules(path, set(files)) - {module}:
            if not module.startswith(target + "."):  # a package's own modules do not "import" it
                out[target].add(module.split(".")[0])
    return out


def readme_rows() -> dict[str, tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            rows[match["path"]] = (match["what"].strip(), match["importers"].strip())
    return rows


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in python_files() if p.name not in ("__init__.py", "__main__.py"))
    assert [name for name, count in names.items() if count > 1] == []
    packages = {p.parent.name for p in python_files() if p.name == "__init__.py"}
    assert {Path(name).stem for name in names} & packages == set(), "a module named like a package"


def test_the_layers_import_in_one_direction():
    """vae imports nothing of the others, trainables only vae, sweeps not bench; Ray stays out of vae."""
    for path in python_files():
        module = module_name(path)
        layer = PACKAGES.index(module.split(".")[0])
        for target in imported_modules(path, {module_name(p) for p in python_files()}):
            assert PACKAGES.index(target.split(".")[0]) <= layer, f"{module} imports {target}"
        if module.startswith("vae"):
            assert not re.search(r"^\s*(import ray|from ray)", path.read_text(), re.M), f"{module} imports Ray"


def test_the_readme_layout_table_matches_the_tree_and_the_imports():
    rows = readme_rows()
    expected = importers()
    assert set(rows) >= {table_path(module) for module in expected}, "modules missing from the README's Layout"
    for path, (what, listed) in rows.items():
        assert (REPO / path).exists(), f"README Layout names {path}, which does not exist"
        assert what, f"README Layout: {path} says nothing of what it holds"
        module = path.removesuffix(".py").removesuffix("/").replace("/", ".")
        if module in expected:
            actual = ", ".join(p for p in PACKAGES if p in expected[module]) or "—"
            assert listed == actual, f"README Layout: {path} is imported by {actual}, not {listed}"
