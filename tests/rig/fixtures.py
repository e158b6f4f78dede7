"""pytest fixtures for the integration-test rig (loaded via the root conftest.py).

``capture``
    a started :class:`~tests.rig.postfix.CaptureServer` on a free 127.0.0.1 port.
``postfix_factory``
    ``make(*, relay_port=None, smtpd_port=None, main_cf=None, master_cf_extra="",
    start=True) -> PrivatePostfix``: private Postfix instances in fresh ``/tmp/lf-pf-*``
    directories, relaying to the ``capture`` server unless ``relay_port`` is given;
    all stopped (and their directories removed; ``LF_RIG_KEEP=1`` keeps them) at
    teardown.  When the test failed, the maillog tail is printed at teardown.

One rule for everything a test needs from the machine: without it the test is
skipped with the reason -- and fails instead under CI (:func:`in_ci`: ``CI`` set to
``true``, ``1`` or ``yes``), so CI never skips silently.  :func:`require` checks
binaries (and root), :func:`require_module` a Python module (use it, not
``pytest.importorskip``), :func:`skip_or_fail` anything else.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, Protocol

import pytest

from tests.rig.postfix import CaptureServer, PrivatePostfix, free_port, missing_binaries

POSTFIX_BINARIES = ("postfix", "postconf", "postqueue", "postsuper")


def in_ci() -> bool:
    """The one CI predicate: ``CI`` is ``true``, ``1`` or ``yes`` (any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test for `reason`; under CI (`in_ci`) fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} -- CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


def require_module(name: str) -> ModuleType:
    """Import and return module `name`; when it is missing, `skip_or_fail`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"the Python module {name} is not installed ({exc}); pip install -e '.[test]' has it")


def require(*binaries: str, root: bool = False) -> None:
    """Skip unless ``binaries`` exist (and we are root, if ``root``); fail under CI=true."""
    problems = []
    missing = missing_binaries(*binaries)
    if missing:
        problems.append(f"missing {', '.join(missing)} (run scripts/bootstrap.sh as root)")
    if root and os.geteuid() != 0:
        problems.append("needs root (a private Postfix master runs as root)")
    if problems:
        skip_or_fail("; ".join(problems))


class PostfixFactory(Protocol):
    def __call__(
        self,
        *,
        relay_port: int | None = None,
        smtpd_port: int | None = None,
        main_cf: Mapping[str, str | None] | None = None,
        master_cf_extra: str = "",
        start: bool = True,
    ) -> PrivatePostfix: ...


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    """A running SMTP capture server on 127.0.0.1 (the final destination)."""
    with CaptureServer() as server:
        yield server


@pytest.fixture
def postfix_factory(request: pytest.FixtureRequest) -> Iterator[PostfixFactory]:
    """Factory of private Postfix instances; see the module docstring."""
    require(*POSTFIX_BINARIES, root=True)
    instances: list[PrivatePostfix] = []
    workdirs: list[Path] = []

    def make(
        *,
        relay_port: int | None = None,
        smtpd_port: int | None = None,
        main_cf: Mapping[str, str | None] | None = None,
        master_cf_extra: str = "",
        start: bool = True,
    ) -> PrivatePostfix:
        if relay_port is None:
            relay_port = request.getfixturevalue("capture").port
        # not below tmp_path: its 0700 ancestors are closed to the postfix user
        workdir = Path(tempfile.mkdtemp(prefix="lf-pf-", dir="/tmp"))
        workdir.chmod(0o755)
        workdirs.append(workdir)
        while smtpd_port is None or smtpd_port == relay_port:
            smtpd_port = free_port()
        pf = PrivatePostfix(
            workdir,
            smtpd_port=smtpd_port,
            relay_port=relay_port,
            main_cf=main_cf,
            master_cf_extra=master_cf_extra,
        )
        instances.append(pf)
        if start:
            pf.start()
        return pf

    yield make

    failed = request.node.stash.get(_CALL_FAILED, False)
    errors: list[str] = []
    for pf in reversed(instances):
        if failed:
            print(f"--- {pf!r}: maillog tail ---\n{pf.maillog_tail(40)}")
        try:
            pf.stop()
        except Exception as exc:  # keep stopping the others
            errors.append(f"{pf!r}: {exc}")
    if os.environ.get("LF_RIG_KEEP") != "1":
        for d in workdirs:
            shutil.rmtree(d, ignore_errors=True)
    if errors:
        pytest.fail("could not stop: " + "; ".join(errors), pytrace=False)


__all__ = ["POSTFIX_BINARIES", "PostfixFactory", "capture", "in_ci", "postfix_factory", "require", "require_module",
           "skip_or_fail"]
