"""The code's shape: every import runs down the floors, and --help needs no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# Lowest first. A module may import from its own package and from lower floors only.
FLOORS = [
    ("utils",),
    ("config",),
    ("models",),
    ("evaluation",),
    ("pruning",),
    ("reporting",),
    ("export",),
    ("runner",),
    ("main",),
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def kit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level kit package) of every import in a file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in FLOOR]
    return found


def kit_modules() -> list[Path]:
    return sorted([ROOT / "main.py", ROOT / "config.py",
                   *(p for name in FLOOR if (ROOT / name).is_dir() for p in (ROOT / name).glob("*.py"))])


def test_every_package_of_the_kit_is_on_a_floor():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(FLOOR), f"put {sorted(packages - set(FLOOR))} on a floor in FLOORS"


def test_imports_only_run_downward():
    upward = []
    for path in kit_modules():
        own = path.parent.name if path.parent != ROOT else path.stem
        for line, target in kit_imports(path):
            if target != own and FLOOR[target] >= FLOOR[own]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} (floor {FLOOR[target]}, "
                              f"own floor {FLOOR[own]})")
    assert not upward, "\n".join(upward)


def test_the_floor_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom runner.evaluate import run\n\ndef f():\n    from export import card\n")
    assert kit_imports(bad) == [(2, "runner"), (5, "export")]


@pytest.mark.slow
def test_help_and_argument_errors_load_no_torch():
    """What --help and a bad argument cost is what they import: none of the heavy libraries."""
    code = ("import sys, main\nmain.build_parser().format_help()\n"
            "try:\n    main.main(['--mode', 'custom', '--remove', 'x'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--mode" in done.stdout
