"""ruff's lint and format checks pass on the code (configured in pyproject.toml; `make lint` runs the same)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "examples", "tools"]


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(check):
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail(f"ruff is not installed next to {sys.executable}: run `make setup` (requirements.txt pins it)")
    run = subprocess.run([str(ruff), *check, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    fix = "ruff format src tests examples tools" if check[0] == "format" else "ruff check --fix (then by hand)"
    assert run.returncode == 0, f"{run.stdout}{run.stderr}\nfix with `{fix}`"
