"""The fault points (lamsonfilter/devtools/faults.py) are inert unless a test arms them.

Importing the module, or a transport that calls it, never exits the process,
whatever the environment says; an unknown name raises only when a point is
reached, so a daemon armed with a typo answers with a temporary failure
instead of disappearing at start-up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lamsonfilter.devtools import faults


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setattr(faults, "_armed_cache", {}, raising=False)
    monkeypatch.setattr(faults, "HOLD_SECONDS", 0.0)


def test_import_with_an_unknown_point_in_the_environment_does_not_exit() -> None:
    env = {"LAMSONFILTER_FAULT_POINTS": "no.such.point", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "import lamsonfilter.devtools.faults, lamsonfilter.milter; print('ok')"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_unknown_point_raises_when_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMSONFILTER_FAULT_POINTS", "smtpproxy.after_commit,no.such.point")
    with pytest.raises(faults.FaultPointError, match="no.such.point"):
        faults.reached("smtpproxy.after_commit", "ABC123")


def test_nothing_armed_is_inert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LAMSONFILTER_FAULT_POINTS", raising=False)
    monkeypatch.setenv("LAMSONFILTER_FAULT_DIR", str(tmp_path))
    for point in sorted(faults.POINTS):
        faults.reached(point, "ABC123")
    assert faults.armed() == frozenset() and list(tmp_path.iterdir()) == []


def test_an_armed_point_marks_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAMSONFILTER_FAULT_POINTS", "milter.eom")
    monkeypatch.setenv("LAMSONFILTER_FAULT_DIR", str(tmp_path))
    faults.reached("milter.after_commit", "Q1")
    assert list(tmp_path.iterdir()) == []
    faults.reached("milter.eom", "Q1")
    marker = tmp_path / "milter.eom.reached"
    assert marker.read_text().split()[0] == "Q1"
    marker.unlink()
    faults.reached("milter.eom", "Q2")
    assert not marker.exists()
