"""The package passes mypy --strict and ruff, as STYLE.md asks; CI runs both here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_mypy_strict_on_the_package() -> None:
    result = _run("mypy", "thread_store")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_on_package_tests_and_benchmarks() -> None:
    result = _run("ruff", "check", "thread_store", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
