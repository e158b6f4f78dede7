"""`make run` installs only what running needs; `make test` (CI) installs everything
(issue 14, item 12).

Unit-level: the extras each mode of scripts/bootstrap.sh installs, resolved
through setup.cfg, and the targets the Makefile wires to each mode.  Running
bootstrap in run mode into a scratch virtualenv needs the package index
(the tests use loopback only) and a minute of compiling, so it is not done
here.  Measured by hand into scratch copies of the repository (2026-12-06,
pymilter's wheel already in pip's cache): run mode installed 10 packages
(a 59 MB virtualenv) in 32 s, test mode 29 packages (319 MB) in 34 s.
"""

import configparser
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
TOOLCHAIN = {"mypy", "hypothesis", "atheris", "docutils", "ruff", "pytest"}


def _extras(mode: str) -> list[str]:
    out = subprocess.run(["bash", str(BOOTSTRAP), "--print-extras", mode], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.strip().split(",")


def _requirements(extras: list[str]) -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    section = cfg["options.extras_require"]
    names = set()
    for extra in extras:
        for line in section[extra].split("\n"):
            if line.strip():
                names.add(re.split(r"[\[<>=!~; ]", line.strip(), maxsplit=1)[0].lower())
    return names


def test_run_mode_installs_no_test_toolchain():
    run = _requirements(_extras("run"))
    assert {"pymilter", "aiosmtpd"} <= run  # both demo modes: milter and content filter
    assert not run & TOOLCHAIN, run & TOOLCHAIN


def test_test_mode_installs_everything():
    extras = _extras("test")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert set(extras) == set(cfg["options.extras_require"])  # every extra: a fresh CI machine has it all
    assert TOOLCHAIN <= _requirements(extras)


def test_unknown_mode_is_refused():
    proc = subprocess.run(["bash", str(BOOTSTRAP), "--print-extras", "everything"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 1 and "unknown mode 'everything'" in proc.stderr


@pytest.mark.parametrize("target,mode", [("run", "run"), ("dry-run", "run"), ("test", "test"),
                                         ("bootstrap", "test"), ("check", "test")])
def test_make_targets_bootstrap_in_the_right_mode(target, mode):
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    calls = [line for line in plan.splitlines() if "bootstrap.sh" in line]
    assert calls == [f"bash scripts/bootstrap.sh {mode}"], plan


def test_ci_runs_make_test():
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("make test")


def test_editable_install_is_a_path_entry():
    """compat mode: a directory named lamsonfilter in the cwd cannot shadow the package (item 2)."""
    assert "--config-settings editable_mode=compat" in BOOTSTRAP.read_text()
