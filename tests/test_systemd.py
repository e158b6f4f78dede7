"""The shipped systemd units pass systemd-analyze verify."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rig.fixtures import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
UNIT_DIR = ROOT / "conf" / "systemd"
#: Named, not globbed: an empty glob would make every test below a silent skip.
UNIT_NAMES = ("lamsonfilter-milter.service", "lamsonfilter-smtpproxy.service", "lamsonfilter-deq.service")
UNITS = [UNIT_DIR / name for name in UNIT_NAMES]


def test_the_shipped_units_are_the_ones_tested():
    assert sorted(p.name for p in UNIT_DIR.glob("*.service")) == sorted(UNIT_NAMES)


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        skip_or_fail("systemd-analyze (Debian's systemd package) is not installed")
    return exe


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    exe = analyze()
    # the units name the documented install location; point it at this checkout's command
    installed = Path(sys.executable).parent / "lamsonfilter"
    assert installed.exists()
    text = unit.read_text()
    assert "/opt/lamsonfilter/bin/lamsonfilter" in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/opt/lamsonfilter/bin/lamsonfilter", str(installed)))
    proc = subprocess.run([exe, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_is_a_sandboxed_notify_service_with_reload(unit):
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "User=lamsonfilter",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "StateDirectory=lamsonfilter"):
        assert line in text


def test_verify_catches_a_broken_unit(tmp_path):
    exe = analyze()
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nType=notify\nExecStart=/nonexistent/lamsonfilter milter\n")
    proc = subprocess.run([exe, "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


def _environment(unit: Path) -> dict[str, str]:
    return dict(line[len("Environment="):].split("=", 1) for line in unit.read_text().splitlines()
                if line.startswith("Environment="))


def test_the_deq_unit_reads_the_queue_postfix_writes_and_may_write_there():
    """LAMSONFILTER_QUEUE is the Maildir of conf/postfix/main.cf.queue ($virtual_mailbox_base/queue/),
    below a ReadWritePaths= entry (ProtectSystem=strict makes the rest read-only); the quarantine is
    the content filter's, so `lamsonfilter quarantine` finds both."""
    from tests.rig.deploy_milter import read_main_cf

    unit = UNIT_DIR / "lamsonfilter-deq.service"
    env = _environment(unit)
    main = read_main_cf(ROOT / "conf" / "postfix" / "main.cf.queue")
    box = main["virtual_mailbox_maps"].split("=", 1)[1].strip(" }")
    assert box.endswith("/")  # Maildir delivery
    assert env["LAMSONFILTER_QUEUE"] + "/" == f"{main['virtual_mailbox_base']}/{box}"
    writable = [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith("ReadWritePaths=")]
    assert any(env["LAMSONFILTER_QUEUE"].startswith(w.rstrip("/") + "/") for w in writable), writable
    assert "${LAMSONFILTER_QUEUE}" in unit.read_text() and "${LAMSONFILTER_QUARANTINE}" in unit.read_text()
    assert env["LAMSONFILTER_QUARANTINE"] == _environment(UNIT_DIR / "lamsonfilter-smtpproxy.service")[
        "LAMSONFILTER_QUARANTINE"]
