"""The package's layers import one way (docs/DESIGN.md, "Layout"): what each subpackage may import
of the others, read from every module's import statements (function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_vl_triton"
# subpackage -> the other subpackages it may import (its own modules always)
ALLOWED = {
    "kernels": set(),
    "parallel": set(),
    "modeling": {"kernels", "parallel"},
    "engine": {"modeling", "kernels", "parallel"},
    "serving": {"engine", "modeling", "kernels", "parallel"},
    "clients": set(),
    "testing": {"modeling"},
    "cli": {"serving", "clients", "engine", "modeling", "kernels", "parallel", "testing"},
    "benchmarks": {"cli", "serving", "clients", "engine", "modeling", "kernels", "parallel", "testing"},
}


def imported_layers(path: Path) -> set[str]:
    """The qwen_vl_triton subpackages a module imports."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "qwen_vl_triton":
                layers |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            layers |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qwen_vl_triton.")}
    return layers


def test_every_subpackage_is_in_the_layer_table():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(ALLOWED), subpackages ^ set(ALLOWED)


def test_no_import_runs_back_up_a_layer():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            bad = imported_layers(path) - allowed - {layer}
            if bad:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_top_level_names_load_lazily():
    source = (PACKAGE / "__init__.py").read_text()
    tree = ast.parse(source)
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
             and not (isinstance(n, ast.ImportFrom) and n.module in ("__future__", "importlib", "typing"))
             and not (isinstance(n, ast.Import) and [a.name for a in n.names] == ["importlib"])]
    assert not eager, f"qwen_vl_triton/__init__.py imports at load time: {[ast.unparse(n) for n in eager]}"
