"""The house's rules that code can check: imports only run down the floors (a stage never
imports a higher one, even inside a function), the library never prints, and `cud --help`
lists the commands in pipeline order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "cud"

#: floor of each top-level part of the package, lowest first (ARCHITECTURE.md's floors)
FLOORS = {
    "errors": 0, "limits": 0, "progress": 0, "tables": 0, "statistics": 0, "prices": 0,
    "folders": 0,
    "data": 1, "models": 2, "circuits": 3, "unlearning": 4, "difficulty": 5, "analysis": 6,
    "report": 7, "runtime": 8, "config": 9, "workflow": 10, "cli": 11, "__init__": 12,
}


def _part(module: str) -> str:
    """``cud.circuits.store`` -> ``circuits``; ``cud`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every cud import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cud" or node.module.startswith("cud."):
                for alias in node.names:  # from cud import x: x may be a sub-package
                    name = node.module if node.module != "cud" else f"cud.{alias.name}"
                    found.append((node.lineno, name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name == "cud" or a.name.startswith("cud.")]
    return found


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" \
        else ".".join(rel.parts)


def test_every_module_has_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts <= set(FLOORS), parts - set(FLOORS)


def test_imports_only_run_down():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_of(path)
        here = FLOORS[_part(module) if module != "cud" else "__init__"]
        for line, imported in _imports(path):
            there = FLOORS[_part(imported)]
            if there > here:
                wrong.append(f"{path.relative_to(SRC)}:{line} ({module}, floor {here}) imports "
                             f"{imported} (floor {there})")
    assert not wrong, "\n".join(wrong)


def test_the_library_never_prints():
    """Only the command line writes to the terminal (print, sys.stdout/stderr)."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                wrong.append(f"{path.relative_to(SRC)}:{node.lineno} print(...)")
            if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and \
                    getattr(node.value, "id", None) == "sys":
                wrong.append(f"{path.relative_to(SRC)}:{node.lineno} sys.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_help_lists_the_commands_in_pipeline_order(capsys):
    from cud.cli import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    order = ["run", "finetune", "circuits", "unlearn", "baselines", "anchors", "score",
             "validate", "analyze", "report"]
    positions = [text.find(f" {name} ") for name in order]
    assert -1 not in positions, text
    assert positions == sorted(positions), text
