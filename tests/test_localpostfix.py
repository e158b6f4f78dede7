"""The postfix commands of a private instance run outside our process group.

A Ctrl-C at the terminal goes to the whole foreground process group.  The
demo catches it and stops what it started; a ``postfix start`` in the same
group would die half-way instead (possibly after the master was started and
before it wrote its pid file, leaving it behind).  So every postfix command
runs in a session of its own.  Checked with a stand-in ``postconf`` on PATH
that reports its session id.
"""

import os
from pathlib import Path

from lamsonfilter.devtools.localpostfix import PrivatePostfix


def test_postfix_commands_run_in_their_own_session(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "postconf"
    fake.write_text("#!/bin/sh\nawk '{print $6}' /proc/$$/stat\n")  # field 6: the session id
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pf = PrivatePostfix(Path(tmp_path / "pf"), smtpd_port=1, relay_port=2)
    sid = int(pf.postconf("-h", "mail_version").strip())
    assert sid != os.getsid(0)
