"""The modes' deployments, found by name: which rig module builds each mode.

`deployment_class` imports a mode's `Deployment` only when that mode runs;
a mode whose module (or the library it needs) is missing is skipped with
the reason, and fails instead in CI (`tests.rig.fixtures.in_ci`).
`started` runs any one deployment for the length of a ``with`` block.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

from tests.rig.deploy import Deployment
from tests.rig.fixtures import POSTFIX_BINARIES, in_ci, require

__all__ = ["MODES", "deployment", "deployment_class", "started"]

D = TypeVar("D", bound=Deployment)

#: mode -> (module, class) of its Deployment, imported only when that mode runs.
MODES: dict[str, tuple[str, str, str]] = {
    "milter": ("tests.rig.deploy_milter", "MilterDeployment", "Milter"),
    "smtpproxy": ("tests.rig.deploy_smtpproxy", "SmtpproxyDeployment", "aiosmtpd"),
    "queue": ("tests.rig.deploy_queue", "QueueDeployment", "aiosmtpd"),
}


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} -- CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


def deployment_class(mode: str) -> type[Deployment]:
    """The mode's Deployment class, imported lazily; skipped (failed under CI) when missing."""
    module_name, class_name, needs = MODES[mode]
    try:
        importlib.import_module(needs)
    except ImportError as exc:
        _unavailable(f"{mode} mode needs {needs} ({exc}); run scripts/bootstrap.sh")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but imports something missing: a failure, never a skip
        _unavailable(f"{module_name.replace('.', '/')}.py is not written yet (the {mode} deployment)")
    cls: type[Deployment] = getattr(module, class_name)
    return cls


@contextmanager
def started(dep: D, *binaries: str) -> Iterator[D]:
    """`dep`, started (skipped -- failed under CI -- without a root Postfix or one of `binaries`);
    stopped at the end, its logs printed (pytest shows them only for a failed test)."""
    try:
        require(*POSTFIX_BINARIES, *binaries, root=True)
        dep.start()
        yield dep
    finally:
        print(dep.diagnostics())
        dep.stop()


@pytest.fixture(params=list(MODES))
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A started deployment of one mode; its logs are printed if the test fails."""
    with started(deployment_class(request.param)()) as dep:
        yield dep
