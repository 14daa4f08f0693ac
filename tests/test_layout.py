"""The README's "Where things live" table matches the tree: every module is listed in it,
and no module imports one listed below its own row (function-level imports included)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selfcleanse_jax"


def _rows() -> list[list[str]]:
    """The names in the first column of each row of the table, relative to the package."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| module | owns |") :].split("\n\n")[0].splitlines()[2:]
    return [
        [
            name.removeprefix("selfcleanse_jax/")
            for name in re.findall(r"`([^`]+)`", row.split("|")[1])
        ]
        for row in table
    ]


def _row_of(relative: str, rows: list[list[str]]) -> int:
    for index, names in enumerate(rows):
        for name in names:
            if relative == name or (name.endswith("/") and relative.startswith(name)):
                return index
    raise AssertionError(f"selfcleanse_jax/{relative} is not in the README's table")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, leaving out the top-level package's __init__."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            modules[".".join(parts)] = path
    return modules


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfcleanse_jax"):
            if node.module == "selfcleanse_jax":
                found |= {f"selfcleanse_jax.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("selfcleanse_jax.")}
    return found


def test_every_module_is_in_the_table_and_imports_only_rows_above_or_its_own():
    rows = _rows()
    modules = _modules()
    row = {name: _row_of(str(path.relative_to(PACKAGE)), rows) for name, path in modules.items()}
    upward = [
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(path)
        if target in row and row[target] > row[name]
    ]
    assert not upward, upward
    assert all(target in modules for path in modules.values() for target in _imports(path))
