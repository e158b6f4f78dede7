"""What the content filter reads from a Postfix configuration directory: message_size_limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lamsonfilter.app import StartupError
from lamsonfilter.contentfilter.postfix import size_limit
from lamsonfilter.contentfilter.server import with_postfix_size
from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.fixtures import in_ci


def config_dir(tmp_path: Path, main_cf: str) -> Path:
    if shutil.which("postconf") is None and not Path("/usr/sbin/postconf").exists():
        if in_ci():
            pytest.fail("postconf (Debian's postfix package) is required in CI")
        pytest.skip("postconf not installed")
    d = tmp_path / "postfix"
    d.mkdir(parents=True)
    (d / "main.cf").write_text(main_cf)
    return d


def test_size_limit_is_read_with_its_default(tmp_path: Path) -> None:
    assert size_limit(config_dir(tmp_path, "message_size_limit = 52428800\n")) == 52428800
    assert size_limit(config_dir(tmp_path / "b", "")) == 10240000  # Postfix's default
    assert size_limit(config_dir(tmp_path / "c", "message_size_limit = 0\n")) is None


def test_the_filter_announces_at_least_postfix_s_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    big = config_dir(tmp_path, "message_size_limit = 52428800\n")
    cfg = ProxyConfig(app_dir=tmp_path, postfix_config=big)
    assert with_postfix_size(cfg).max_size == 52428800
    assert with_postfix_size(ProxyConfig(app_dir=tmp_path, postfix_config=big, max_size=60_000_000)).max_size == \
        60_000_000
    assert with_postfix_size(ProxyConfig(app_dir=tmp_path)).max_size == 10_240_000  # no --postfix-config
    unlimited = config_dir(tmp_path / "u", "message_size_limit = 0\n")
    assert with_postfix_size(ProxyConfig(app_dir=tmp_path, postfix_config=unlimited)).max_size == 10_240_000
    assert "no message_size_limit (0)" in caplog.text


def test_an_unreadable_configuration_is_a_startup_error(tmp_path: Path) -> None:
    broken = config_dir(tmp_path, "message_size_limit = lots\n")
    with pytest.raises(StartupError, match="message_size_limit"):
        size_limit(broken)
