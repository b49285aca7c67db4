"""Every command-line option of the package's and the benchmarks' commands says what it does."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(p for folder in ("bench", "simulator", "compressed_comm")
                  for p in (REPO / folder).rglob("*.py") if "add_argument" in p.read_text())


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_option_has_help_text(path):
    missing = [node.args[0].value for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
               and node.args and isinstance(node.args[0], ast.Constant)
               and not any(k.arg == "help" for k in node.keywords)]
    assert not missing, f"{path.name}: options without help text: {missing}"
