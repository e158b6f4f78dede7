"""`lamsonfilter check --postfix-config`: the findings of issue 12 items 1, 8, 11 and issue 14 items 6, 11.

Every configuration here is read by the real ``postconf`` (and ``postmap`` for
lookup tables) from a scratch directory, as ``check`` reads /etc/postfix.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from lamsonfilter.check import app001
from lamsonfilter.check.milter import smtpd_milters_value
from lamsonfilter.check.postfix import check_postfix
from lamsonfilter.daemon.endpoint import parse_milter_socket
from tests.rig.checks import (
    APP,
    GOOD_MAIN,
    GOOD_MASTER,
    ids,
    invoke,
    need_postconf,
    write_postfix,
)

SETTINGS = {"HOSTS": ["lists.example.org"], "RELAY": "127.0.0.1:10026"}

MILTER_MAIN = (
    "smtpd_milters = { unix:/lamsonfilter/milter.sock, default_action=tempfail }\n"
    "non_smtpd_milters = { unix:/lamsonfilter/milter.sock, default_action=tempfail }\n"
    "milter_default_action = tempfail\nrelay_domains = lists.example.org\n"
)
MILTER_MASTER = """\
smtp      inet  n       -       y       -       -       smtpd
127.0.0.1:10026 inet n  -       n       -       -       smtpd
    -o smtpd_milters=
    -o receive_override_options=no_milters
"""
SPOOL_SOCKET = "unix:/var/spool/postfix/lamsonfilter/milter.sock"


def found(pf: Path, settings=SETTINGS, **kw) -> set[str]:
    return {f.id for f in check_postfix(pf, settings, **kw)}


@pytest.fixture(autouse=True)
def _postconf():
    need_postconf()


def test_the_good_setups_have_no_findings(tmp_path):
    assert found(write_postfix(tmp_path / "cf", GOOD_MAIN, GOOD_MASTER), max_size=10240000) == set()
    assert found(write_postfix(tmp_path / "m", MILTER_MAIN, MILTER_MASTER), milter_socket=SPOOL_SOCKET) == set()


# ------------------------------------------------------------------ PF004: the application's domains
@pytest.mark.parametrize("domains", [
    "relay_domains = lists.example.org",
    "relay_domains = example.com, LISTS.example.org",
    "virtual_alias_domains = lists.example.org",
    "virtual_mailbox_domains = inline:{ lists.example.org=yes }",
    "mydestination = $myhostname, lists.example.org",
    "relay_domains = .example.org",
])
def test_a_domain_in_any_address_class_is_accepted(tmp_path, domains):
    main = GOOD_MAIN.replace("relay_domains = lists.example.org\n", domains + "\n")
    assert "PF004" not in found(write_postfix(tmp_path / "pf", main, GOOD_MASTER))


@pytest.mark.parametrize("domains", ["relay_domains = example.com", "relay_domains =",
                                     "virtual_mailbox_domains = inline:{ other.example.org=yes }"])
def test_a_domain_in_no_address_class_is_pf004(tmp_path, domains):
    main = GOOD_MAIN.replace("relay_domains = lists.example.org\n", domains + "\n")
    pf = write_postfix(tmp_path / "pf", main, GOOD_MASTER)
    findings = [f for f in check_postfix(pf, SETTINGS) if f.id == "PF004"]
    assert len(findings) == 1 and findings[0].severity == "error"
    assert "lists.example.org" in findings[0].message and "Relay access denied" in findings[0].message
    assert "relay_domains" in findings[0].fix and "main.cf.domains" in findings[0].fix
    # in milter mode as well
    pf = write_postfix(tmp_path / "m", MILTER_MAIN.replace("relay_domains = lists.example.org\n", domains + "\n"),
                       MILTER_MASTER)
    assert "PF004" in found(pf, milter_socket=SPOOL_SOCKET)


# ------------------------------------------------------------------ content filter
def test_no_policy_service_is_pf121_backscatter(tmp_path):
    main = GOOD_MAIN.replace("check_policy_service inet:127.0.0.1:10027, ", "")
    f = [x for x in check_postfix(write_postfix(tmp_path / "pf", main, GOOD_MASTER), SETTINGS) if x.id == "PF121"]
    assert f and "backscatter" in f[0].message and "check_policy_service" in f[0].fix


def test_a_listener_with_fewer_processes_than_the_filter_transport_is_pf122(tmp_path):
    small = GOOD_MASTER.replace("127.0.0.1:10026 inet n  -       n       -       10", "127.0.0.1:10026 inet n - n - 2")
    assert small != GOOD_MASTER
    f = [x for x in check_postfix(write_postfix(tmp_path / "pf", GOOD_MAIN, small), SETTINGS) if x.id == "PF122"]
    assert f and "2 processes" in f[0].message and "10 deliveries" in f[0].message
    # "-" means default_process_limit (100): more than the transport's 10
    dash = GOOD_MASTER.replace("127.0.0.1:10026 inet n  -       n       -       10", "127.0.0.1:10026 inet n - n - -")
    assert "PF122" not in found(write_postfix(tmp_path / "dash", GOOD_MAIN, dash))


@pytest.mark.parametrize("limit, max_size, expect", [
    ("52428800", 10240000, True),    # issue 12 item 1: 12 MB accepted on port 25, bounced by the filter
    ("0", 10240000, True),           # no limit at all
    ("10240000", 10240000, False),
    ("52428800", 52428800, False),
    ("52428800", None, False),       # the size is not known: nothing to compare
])
def test_a_filter_size_below_message_size_limit_is_pf123(tmp_path, limit, max_size, expect):
    pf = write_postfix(tmp_path / "pf", GOOD_MAIN + f"message_size_limit = {limit}\n", GOOD_MASTER)
    findings = [f for f in check_postfix(pf, SETTINGS, max_size=max_size) if f.id == "PF123"]
    assert bool(findings) == expect
    if expect:
        assert findings[0].severity == "error" and "--max-size" in findings[0].fix


def test_check_command_takes_the_filter_size(tmp_path):
    pf = write_postfix(tmp_path / "pf", GOOD_MAIN + "message_size_limit = 52428800\n", GOOD_MASTER)
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf, "--max-size", "10240000")
    assert r.exit_code == 1 and "PF123" in ids(r.output) and "--max-size 52428800" in r.output


FILTER_README_MAIN = ("relay_domains = lists.example.org\n"
                      "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:10027, "
                      "reject_unauth_destination\n")
FILTER_README_MASTER = GOOD_MASTER.replace(
    "smtp      inet  n       -       y       -       -       smtpd\n",
    "smtp      inet  n       -       y       -       -       smtpd\n"
    "    -o content_filter=lamsonfilter:[127.0.0.1]:10025\n"
    "    -o receive_override_options=no_address_mappings\n")


def test_content_filter_only_on_the_smtp_service_is_a_valid_setup(tmp_path):
    """FILTER_README's other way: -o content_filter= on `smtp inet` only: no PF002 (issue 12 item 11)."""
    pf = write_postfix(tmp_path / "pf", FILTER_README_MAIN, FILTER_README_MASTER)
    assert found(pf) == set()
    # and the checks of a content-filter set-up still apply to it
    looping = write_postfix(tmp_path / "loop", FILTER_README_MAIN + "content_filter = lamsonfilter:[127.0.0.1]:10025\n",
                            FILTER_README_MASTER.replace("    -o content_filter=\n", ""))
    assert "PF111" in found(looping)
    nopolicy = write_postfix(tmp_path / "np", "relay_domains = lists.example.org\n", FILTER_README_MASTER)
    assert found(nopolicy) == {"PF121"}


def test_the_daemon_starts_on_a_filter_readme_style_setup(tmp_path):
    pytest.importorskip("aiosmtpd")
    from lamsonfilter.contentfilter.server import build_runtime
    from lamsonfilter.smtpproxy import ProxyConfig

    pf = write_postfix(tmp_path / "pf", FILTER_README_MAIN, FILTER_README_MASTER)
    runtime = build_runtime(ProxyConfig(app_dir=Path(APP), database="memory:", quarantine=tmp_path / "q",
                                        postfix_config=pf))
    runtime.stop()


# ------------------------------------------------------------------ milter: chroot, non_smtpd_milters
def test_an_absolute_spool_path_for_a_chrooted_smtpd_is_pf204(tmp_path):
    """Issue 12 item 8: unix:/var/spool/postfix/... breaks Debian's chrooted smtpd (451 4.7.1)."""
    pf = write_postfix(tmp_path / "pf", MILTER_MAIN.replace("unix:/lamsonfilter/", "unix:/var/spool/postfix/lamsonfilter/"),
                       MILTER_MASTER)
    for sock in (SPOOL_SOCKET, None):
        f = [x for x in check_postfix(pf, SETTINGS, milter_socket=sock) if x.id == "PF204"]
        assert f and f[0].severity == "error", sock
        assert "chrooted" in f[0].message and "unix:/lamsonfilter/milter.sock" in f[0].fix
    # the same path is right for an smtpd that is not chrooted
    unchrooted = write_postfix(tmp_path / "n", MILTER_MAIN.replace("unix:/lamsonfilter/", "unix:/var/spool/postfix/lamsonfilter/"),
                               MILTER_MASTER.replace("-       y       -", "-       n       -"))
    assert "PF204" not in found(unchrooted, milter_socket=SPOOL_SOCKET)
    # ... and the relative path is wrong for it
    relative = write_postfix(tmp_path / "r", MILTER_MAIN, MILTER_MASTER.replace("-       y       -", "-       n       -"))
    assert "PF204" in found(relative, milter_socket=SPOOL_SOCKET)


def test_a_socket_outside_the_chroot_is_pf204(tmp_path):
    pf = write_postfix(tmp_path / "pf", MILTER_MAIN.replace("unix:/lamsonfilter/milter.sock", "unix:/run/lamsonfilter/milter.sock"),
                       MILTER_MASTER)
    f = [x for x in check_postfix(pf, SETTINGS, milter_socket="unix:/run/lamsonfilter/milter.sock") if x.id == "PF204"]
    assert f and "cannot reach" in f[0].message


def test_check_command_knows_the_chroot(tmp_path):
    pf = write_postfix(tmp_path / "pf", MILTER_MAIN.replace("unix:/lamsonfilter/", "unix:/var/spool/postfix/lamsonfilter/"),
                       MILTER_MASTER)
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf, "--milter-socket", SPOOL_SOCKET)
    assert r.exit_code == 1 and "PF204" in ids(r.output), r.output


def test_locally_submitted_mail_bypassing_the_milter_is_pf211(tmp_path):
    pf = write_postfix(tmp_path / "pf", MILTER_MAIN.replace(
        "non_smtpd_milters = { unix:/lamsonfilter/milter.sock, default_action=tempfail }\n", "non_smtpd_milters =\n"),
        MILTER_MASTER)
    f = [x for x in check_postfix(pf, SETTINGS, milter_socket=SPOOL_SOCKET) if x.id == "PF211"]
    assert f and "sendmail" in f[0].message and "non_smtpd_milters = {" in f[0].fix


def test_the_milter_start_up_line_gives_the_value_for_the_chroot(tmp_path):
    endpoint = parse_milter_socket(SPOOL_SOCKET)
    chrooted = write_postfix(tmp_path / "c", MILTER_MAIN, MILTER_MASTER)
    assert smtpd_milters_value(endpoint, chrooted) == "unix:/lamsonfilter/milter.sock"
    plain = write_postfix(tmp_path / "n", MILTER_MAIN, MILTER_MASTER.replace("-       y       -", "-       n       -"))
    assert smtpd_milters_value(endpoint, plain) == SPOOL_SOCKET
    # without a configuration: Debian's chrooted smtpd first, the other value named too
    guess = smtpd_milters_value(endpoint)
    assert guess.startswith("unix:/lamsonfilter/milter.sock ") and SPOOL_SOCKET in guess
    assert smtpd_milters_value(parse_milter_socket("inet:8891@127.0.0.1")) == "inet:127.0.0.1:8891"


def test_the_milter_prints_the_chroot_value_at_start(tmp_path):
    """The start-up line of a real `lamsonfilter milter` (stopped with SIGTERM once it is listening)."""
    pytest.importorskip("Milter")
    import signal
    import time

    chrooted = write_postfix(tmp_path / "c", MILTER_MAIN, MILTER_MASTER)
    queue = tmp_path / "spool"
    (queue / "lamsonfilter").mkdir(parents=True)
    (tmp_path / "c" / "main.cf").write_text((tmp_path / "c" / "main.cf").read_text() + f"queue_directory = {queue}\n")
    sock = f"unix:{queue}/lamsonfilter/milter.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "milter", "--app", str(APP), "--database", "memory:",
         "--socket", sock, "--socket-group", "", "--postfix-config", str(chrooted)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        lines = []
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "milter listening on" in line:
                break
        text = "".join(lines)
        assert "Postfix: smtpd_milters = unix:/lamsonfilter/milter.sock" in text, text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


# ------------------------------------------------------------------ APP001 says what to fix
def test_app001_fix_names_the_problem(tmp_path):
    app = tmp_path / "x"
    invoke("gen", "x", "--dest", app)
    (app / "config/settings.py").write_text("HANDLERS = ['missing']\n")
    r = invoke("check", "--app", app)
    assert r.exit_code == 1 and ids(r.output) == ["APP001"]
    fix = next(line for line in r.output.splitlines() if line.strip().startswith("fix:"))
    assert "fix the application so that it starts" not in fix
    assert "settings.py" in fix and "missing" in fix
    assert app001("something odd").fix.endswith("something odd")
