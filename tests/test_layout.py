"""The code's shape: every import runs down the floors, and --help needs no torch."""

import ast
import subprocess
import sys
import time
from pathlib import Path

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


def test_help_loads_no_torch_and_answers_within_two_seconds():
    code = ("import sys, main\nmain.build_parser().format_help()\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "--mode" in done.stdout
    assert elapsed < 2.0, f"main.py --help took {elapsed:.2f} s"
