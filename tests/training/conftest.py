"""Fixtures shared by the synthetic-data tests: a dciodvfy runner."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

DCIODVFY = "/usr/bin/dciodvfy"


def _dciodvfy_messages(path: Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy on one file; return its (errors, warnings) lines."""
    done = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


@pytest.fixture
def dciodvfy() -> Callable[[Path], tuple[list[str], list[str]]]:
    """Return a function that runs dciodvfy on a file and gives its (errors, warnings)."""
    if shutil.which(DCIODVFY) is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return _dciodvfy_messages
