"""The layers import only downwards, read from the source (ast), so a new import that runs back up fails here:
`storage/` and `verifiers/` import nothing of `tasks/` or `flows/`; `tasks/` imports nothing of `flows/`;
of `storage/`, the layers above the flows use only its bottom modules (the error tree and the schemas);
inside `tasks/`, `search/` (the engine and the algorithms) imports neither `pairs/` nor `budget.py`, which
are configured beside it and run on its output."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO

BOTTOM = ("storage.errors", "storage.schema", "storage.render", "storage.secrets", "storage.dedup")  # storage's bottom modules (no I/O)

# (folder, module prefixes its files must not import, exceptions to those)
RULES = [
    ("storage", ("tasks", "flows"), ()),
    ("verifiers", ("tasks", "flows", "storage"), BOTTOM),
    ("tasks", ("flows", "storage"), BOTTOM),
    ("tasks/search", ("tasks.pairs", "tasks.budget"), ()),
]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved against its package."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from tasks import budget` imports the module tasks.budget.
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            out.append((node.lineno, base))
    return out


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(folder: str, banned: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in imports(path):
            if _under(module, banned) and not _under(module, allowed):
                found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return sorted(set(found))


@pytest.mark.parametrize("folder,banned,allowed", RULES, ids=[f for f, _, _ in RULES])
def test_no_import_runs_from_a_lower_layer_to_a_higher_one(folder, banned, allowed):
    assert violations(folder, banned, allowed) == []


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    # The rule must not be vacuous: an import hidden in a function body or written relatively still counts.
    pkg = tmp_path / "tasks" / "search"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from tasks.pairs import make_pairs\n")
    (pkg / "y.py").write_text("from .. import budget\n")
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "z.py").write_text("import flows.config as c\n")
    (tmp_path / "tasks" / "w.py").write_text("from storage.errors import ConfigError\nfrom storage import release\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("tasks/search", ("tasks.pairs", "tasks.budget")) == [
        "tasks/search/x.py:2 imports tasks.pairs", "tasks/search/x.py:2 imports tasks.pairs.make_pairs",
        "tasks/search/y.py:1 imports tasks.budget"]
    assert violations("storage", ("tasks", "flows")) == ["storage/z.py:1 imports flows.config"]
    assert violations("tasks", ("flows", "storage"), BOTTOM) == [
        "tasks/w.py:2 imports storage",
        "tasks/w.py:2 imports storage.release"]
