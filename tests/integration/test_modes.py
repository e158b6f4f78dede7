"""The `deployment` fixture's rule for a mode whose module is missing: skip, but fail under CI=true."""

from __future__ import annotations

import sys

import pytest

from tests.rig import modes
from tests.rig.deploy import Deployment


@pytest.fixture
def missing_mode(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(modes.MODES, "nomode",
                        ("tests.rig.deploy_nomode", "NomodeDeployment", "sys"))
    return "nomode"


def test_missing_deployment_module_is_skipped_with_the_reason(missing_mode: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="deploy_nomode.py is not written yet"):
        modes.deployment_class(missing_mode)


def test_missing_deployment_module_fails_under_ci(missing_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        modes.deployment_class(missing_mode)


def test_a_broken_deployment_module_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "lf_broken_deploy.py").write_text("import lf_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(modes.MODES, "broken", ("lf_broken_deploy", "X", "sys"))
    with pytest.raises(ModuleNotFoundError, match="lf_no_such_dependency"):
        modes.deployment_class("broken")
    sys.modules.pop("lf_broken_deploy", None)


def test_the_modes_that_exist_give_deployments() -> None:
    for mode in ("milter", "smtpproxy", "queue"):
        assert issubclass(modes.deployment_class(mode), Deployment)
