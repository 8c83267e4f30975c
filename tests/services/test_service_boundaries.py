"""The decoder and encoder services share code only through ``services.common``: neither imports the other.

Every module of one service package is parsed with ``ast``; any import of the other package (absolute,
``from services import encoder`` included) fails the test with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an ``import`` / ``from ... import`` names (relative ones skipped)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def imports_of(package: str, forbidden: str) -> list[str]:
    """``file:line: module`` for every import of ``forbidden`` (a dotted package) in ``package``'s modules."""
    offences = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported_modules(tree):
            if module == forbidden or module.startswith(forbidden + "."):
                offences.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    return offences


@pytest.mark.parametrize(("package", "forbidden"), [("services.decoder", "services.encoder"),
                                                    ("services.encoder", "services.decoder")])
def test_services_do_not_import_each_other(package, forbidden):
    assert (ROOT / package.replace(".", "/") / "__init__.py").is_file()
    assert imports_of(package, forbidden) == [], f"{package} must share code through services.common only"


def test_the_check_sees_every_import_form():
    source = ("import services.encoder.engine\nfrom services.encoder import engine\nfrom services import encoder\n"
              "from .engine import x\nimport services.encoderx\n")
    names = [name for _, name in imported_modules(ast.parse(source))]
    hits = [n for n in names if n == "services.encoder" or n.startswith("services.encoder.")]
    assert hits == ["services.encoder.engine", "services.encoder", "services.encoder.engine", "services.encoder"]
