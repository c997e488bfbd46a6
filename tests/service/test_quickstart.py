"""./quickstart's Python install, run for real against a stand-in interpreter (this test's
``python`` script records its calls and fails the project's install when told to), so that
the script's own logic is exercised without reinstalling the suite's environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$(dirname "$0")/../calls"
case "$*" in
  *"pip install -q -e"*) [ -e "$(dirname "$0")/../fail" ] && { echo "ERROR: no" >&2; exit 1; } ;;
esac
exit 0
"""


def _setup(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "quickstart"), "setup"],
        env={**os.environ, "DICOM_NODE_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _pip_calls(venv: Path) -> int:
    calls = venv / "calls"
    if not calls.exists():
        return 0
    return sum("pip install" in line for line in calls.read_text().splitlines())


def test_a_failed_install_fails_and_is_tried_again(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (venv / "fail").touch()
    first = _setup(venv)
    assert first.returncode == 1
    assert "the Python install failed" in first.stderr
    assert not (venv / ".dicom-node-stamp").exists()
    before = _pip_calls(venv)
    assert _setup(venv).returncode == 1
    assert _pip_calls(venv) > before  # tried again, not taken as installed
    (venv / "fail").unlink()
    assert _setup(venv).returncode == 0
    assert (venv / ".dicom-node-stamp").exists()
    before = _pip_calls(venv)
    assert _setup(venv).returncode == 0
    assert _pip_calls(venv) == before  # installed: nothing to do
