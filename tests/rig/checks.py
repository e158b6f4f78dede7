"""What the ``lamsonfilter check`` tests share: the example application, a
Postfix configuration directory written from text, the good content-filter
set-up, and the finding IDs of the command's output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner, Result

from lamsonfilter.cli import main
from tests.rig.fixtures import skip_or_fail

__all__ = ["APP", "GOOD_MAIN", "GOOD_MASTER", "ROOT", "ids", "invoke", "need_postconf", "write_postfix"]

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "mailinglist"


def invoke(*args: object) -> Result:
    """Run the command line in this process (exceptions propagate)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def need_postconf() -> None:
    """Skip (fail in CI) when Postfix's postconf is not installed."""
    if shutil.which("postconf") is None and not Path("/usr/sbin/postconf").exists():
        skip_or_fail("postconf (Debian's postfix package) is not installed")


def write_postfix(d: Path, main: str, master: str) -> Path:
    """A Postfix configuration directory with these main.cf and master.cf texts."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "main.cf").write_text("compatibility_level = 3.6\n" + main)
    (d / "master.cf").write_text(master)
    return d


GOOD_MASTER = """\
smtp      inet  n       -       y       -       -       smtpd
lamsonfilter unix -     -       n       -       10      smtp
    -o smtp_send_xforward_command=yes
    -o disable_mime_output_conversion=yes
127.0.0.1:10026 inet n  -       n       -       10      smtpd
    -o content_filter=
    -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
"""
GOOD_MAIN = ("content_filter = lamsonfilter:[127.0.0.1]:10025\nreceive_override_options = no_address_mappings\n"
             "relay_domains = lists.example.org\n"
             "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:10027, reject_unauth_destination\n")


def ids(output: str) -> list[str]:
    """The sorted finding IDs (APP..., PF...) in the output of ``lamsonfilter check``."""
    return sorted({line.split()[0] for line in output.splitlines() if line[:3] in ("APP", "PF0", "PF1", "PF2", "PF3")})
