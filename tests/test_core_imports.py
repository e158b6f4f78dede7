"""The core opens no socket and imports neither pymilter nor aiosmtpd."""

import subprocess
import sys

CORE = [
    "lamsonfilter", "lamsonfilter.mail", "lamsonfilter.routing", "lamsonfilter.fsm",
    "lamsonfilter.state", "lamsonfilter.decisions", "lamsonfilter.views", "lamsonfilter.app",
    "lamsonfilter.context", "lamsonfilter.guards", "lamsonfilter.bounce", "lamsonfilter.settings",
    "lamsonfilter.milterparts.plan", "lamsonfilter.contentfilter.plan", "lamsonfilter.queueworker.plan", "lamsonfilter.testing", "lamsonfilter.store.sql",
    "lamsonfilter.cli", "lamsonfilter.automated", "lamsonfilter.feedback", "lamsonfilter.robotsigns",
]


def test_core_imports_no_transport_library():
    code = (
        "import sys\n"
        f"for m in {CORE!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('Milter', 'milter', 'aiosmtpd', 'smtplib', 'socketserver'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_check_itself_sees_a_transport_import():
    # the probe above must be able to fail: importing smtplib shows up
    code = "import sys, smtplib; print('smtplib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
