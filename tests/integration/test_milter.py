"""Milter mode only: the shipped Postfix snippets, a killed milter, OpenDKIM's miltertest, signals.

The scenarios every mode shares are in test_scenarios.py; these are the
properties only a pre-queue milter has (reliability M1) and checks with an
independent milter client (miltertest speaks the MTA side, like Postfix).

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamsonfilter.check import check_postfix
from tests.rig.deploy import LIST_HOST, read_main_cf
from tests.rig.deploy_milter import (
    MAIN_CF,
    MASTER_CF,
    MilterDeployment,
    require_pymilter,
)
from tests.rig.fixtures import POSTFIX_BINARIES, PostfixFactory, require
from tests.rig.modes import started
from tests.rig.postfix import find_binary, wait_for

pytestmark = pytest.mark.postfix

ALICE = "alice@example.com"


@pytest.fixture
def milter_deployment() -> Iterator[MilterDeployment]:
    require_pymilter()
    with started(MilterDeployment()) as dep:
        yield dep


@pytest.fixture
def milter_only() -> Iterator[MilterDeployment]:
    """Just ``lamsonfilter milter`` on a unix socket (no Postfix): for miltertest."""
    require("miltertest")
    require_pymilter()
    dep = MilterDeployment()
    try:
        dep.prepare_app()
        dep.start_filter()
        yield dep
    finally:
        print(dep.diagnostics())
        dep.stop()


# ---------------------------------------------------------------- the shipped configuration
def test_shipped_snippets_load_into_postfix(postfix_factory: PostfixFactory) -> None:
    """conf/postfix/main.cf.milter and master.cf.milter, verbatim, read back with postconf."""
    pf = postfix_factory(main_cf=read_main_cf(MAIN_CF), master_cf_extra=MASTER_CF.read_text(), start=False)
    main = dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                for line in pf.postconf("-n").splitlines())
    milters = main["smtpd_milters"].replace(" ", "")
    assert milters.startswith("{unix:/lamsonfilter/milter.sock,") and "default_action=tempfail" in milters
    assert main["milter_default_action"] == "tempfail"
    assert main["milter_protocol"] == "6"
    assert main["non_smtpd_milters"].replace(" ", "") == main["smtpd_milters"].replace(" ", "")
    assert "{client_addr}" in main["milter_connect_macros"]
    assert main["milter_end_of_data_macros"] == "i"
    for stage in ("connect", "command", "content"):
        assert main[f"milter_{stage}_timeout"].endswith("s")
    services = [line.split() for line in pf.postconf("-M").splitlines()]
    assert ["127.0.0.1:10026", "inet", "n", "-", "n", "-", "-", "smtpd"] in [s[:8] for s in services]
    overrides = pf.postconf("-P")
    assert "127.0.0.1:10026/inet/smtpd_milters =\n" in overrides
    assert "127.0.0.1:10026/inet/receive_override_options = no_milters," in overrides
    assert "127.0.0.1:10026/inet/mynetworks = 127.0.0.0/8" in overrides
    # and lamsonfilter's own checker has nothing to object to (RELAY of the example app: 10026)
    findings = check_postfix(pf.config_dir, {"RELAY": "127.0.0.1:10026"})
    assert [f for f in findings if f.severity == "error"] == [], findings
    pf._run("postfix", "check")  # Postfix itself accepts the whole configuration


# ---------------------------------------------------------------- M1: the milter is down
def test_killed_milter_tempfails_and_nothing_passes_unfiltered(milter_deployment: MilterDeployment) -> None:
    dep = milter_deployment
    tag = f"tag@{LIST_HOST}"
    dep.assert_accepted(dep.send(ALICE, [tag], "before the kill"))
    dep.wait_for_mail(tag, "before the kill")

    dep.kill_filter()  # SIGKILL of the PID this deployment started
    for rcpts, subject in (([tag], "routed while down"), (["someone@example.net"], "passing while down")):
        result = dep.send(ALICE, rcpts, subject)
        dep.assert_tempfailed(result)  # 4xx to the client, nothing in Postfix's queue

    dep.start_filter()
    dep.assert_accepted(dep.send(ALICE, [tag], "after the restart"))
    (msg,) = dep.wait_for_mail(tag, "after the restart")
    assert msg.header_values("X-Lamsonfilter-Test") == ["tagged"]  # filtered, not waved through
    dep.settle()
    subjects = [str(m.message["Subject"]) for m in dep.capture.messages]
    assert "routed while down" not in subjects and "passing while down" not in subjects
    assert subjects.count("after the restart") == 1


def test_many_concurrent_routed_messages(milter_deployment: MilterDeployment) -> None:
    """20 sessions at once, every message through the application and its state store.

    Debian's libmilter moves a connection between worker threads; before the
    application ran in threads of its own, this crashed the milter (SIGSEGV in
    sqlite3's PyGILState_Ensure) within a few hundred messages.
    """
    dep = milter_deployment
    assert dep.postfix is not None and dep.filter_proc is not None
    binary = find_binary("smtp-source")
    assert binary is not None
    n = 400
    proc = subprocess.run([binary, "-s", "20", "-m", str(n), "-l", "2000", "-M", "client.example.test",
                           "-f", ALICE, "-t", f"tag@{LIST_HOST}", f"127.0.0.1:{dep.postfix.smtpd_port}"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dep.wait_for_mail(f"tag@{LIST_HOST}", count=n, timeout=300)
    assert dep.filter_proc.poll() is None, "the milter died"
    assert all(m.header_values("X-Lamsonfilter-Test") == ["tagged"] for m in dep.capture.messages)


def test_internal_error_is_a_plain_451(milter_deployment: MilterDeployment) -> None:
    """The client sees 451 4.3.0 and a fixed text: nothing about the exception (reliability R2, M2)."""
    result = milter_deployment.send(ALICE, [f"crash@{LIST_HOST}"], "crash")
    assert result.reply("DATA") is None and result.final is not None, str(result)
    assert (result.final.code, result.final.text) == (451, "4.3.0 Temporary failure, try again later")


def test_inet_socket_serves_postfix() -> None:
    """The same milter on a loopback TCP socket (with TCP_NODELAY on the listener)."""
    require(*POSTFIX_BINARIES, root=True)
    require_pymilter()
    with MilterDeployment(socket_kind="inet") as dep:
        tag = f"tag@{LIST_HOST}"
        dep.assert_accepted(dep.send(ALICE, [tag], "over tcp"))
        (msg,) = dep.wait_for_mail(tag, "over tcp")
        assert msg.header_values("X-Lamsonfilter-Test") == ["tagged"]
        dep.assert_rejected_unknown(dep.send(ALICE, [f"nope@{LIST_HOST}"], "x"), f"nope@{LIST_HOST}")
        assert "(TCP_NODELAY)" in dep.filter_log.read_text()


# ---------------------------------------------------------------- an independent milter client
MILTERTEST_SCRIPT = r"""
-- Drives lamsonfilter's milter as Postfix would (OpenDKIM's miltertest).
local sock = os.getenv("MT_SOCK")
local function ok(r, what) if r ~= nil then error(what .. ": " .. tostring(r)) end end
local function expect(conn, want, what)
  local got = mt.getreply(conn)
  if got ~= want then error(what .. ": reply " .. string.char(got) .. ", want " .. string.char(want)) end
end

local function main()
local conn = mt.connect(sock, 20, 0.1)
if conn == nil then error("cannot connect to " .. sock) end
ok(mt.negotiate(conn, nil, nil, nil), "negotiate")
if not mt.test_action(conn, SMFIF_ADDHDRS) then error("ADDHDRS not negotiated") end
if mt.test_action(conn, SMFIF_ADDRCPT_PAR) then error("ADDRCPT_PAR negotiated but never used") end
-- with SMFIP_HDR_LEADSPC (which lamsonfilter asks for) header values keep their leading space
local sp = mt.test_option(conn, SMFIP_HDR_LEADSPC) and " " or ""
ok(mt.conninfo(conn, "client.example.test", "192.0.2.10"), "conninfo")
ok(mt.helo(conn, "client.example.test"), "helo")

-- transaction 1: an unknown list address is refused at RCPT, a routed one gets a header
ok(mt.mailfrom(conn, "<alice@example.com>"), "mailfrom")
ok(mt.rcptto(conn, "<nosuchlist@lists.example.org>"), "rcpt unknown")
expect(conn, SMFIR_REPLYCODE, "RCPT to an unknown list address")
ok(mt.rcptto(conn, "<tag@lists.example.org>"), "rcpt tag")
expect(conn, SMFIR_CONTINUE, "RCPT tag@")
ok(mt.header(conn, "From", sp .. "alice@example.com"), "header")
ok(mt.header(conn, "Subject", sp .. "miltertest"), "header")
ok(mt.eoh(conn), "eoh")
ok(mt.bodystring(conn, "hello\r\n"), "body")
ok(mt.eom(conn), "eom")
expect(conn, SMFIR_ACCEPT, "end of message for tag@")
if not mt.eom_check(conn, MT_HDRADD, "X-Lamsonfilter-Test", sp .. "tagged") then error("header not added") end
ok(mt.abort(conn), "abort")  -- Postfix sends ABORT after every transaction

-- transaction 2 on the same connection: a handler that raises -> TEMPFAIL with a reply code
-- (the 451 4.3.0 text is checked through Postfix in test_internal_error_is_a_plain_451)
ok(mt.mailfrom(conn, "<bob@example.net>"), "mailfrom 2")
ok(mt.rcptto(conn, "<crash@lists.example.org>"), "rcpt crash")
ok(mt.header(conn, "Subject", sp .. "crash"), "header 2")
ok(mt.eoh(conn), "eoh 2")
ok(mt.bodystring(conn, "boom\r\n"), "body 2")
ok(mt.eom(conn), "eom 2")
expect(conn, SMFIR_REPLYCODE, "end of message for crash@")
if mt.eom_check(conn, MT_HDRADD) then error("a header was added to a deferred message") end
mt.disconnect(conn)
end

-- this miltertest build prints nothing for a failed script: say why, then fail
local passed, why = pcall(main)
if not passed then
  mt.echo("miltertest FAILED: " .. tostring(why))
  error(why)
end
mt.echo("miltertest: all checks passed")
"""


def run_miltertest(dep: MilterDeployment, script: str) -> subprocess.CompletedProcess[str]:
    path = dep.workdir / "check.lua"
    path.write_text(script)
    binary = find_binary("miltertest")
    assert binary is not None
    return subprocess.run([binary, "-s", str(path)], env={"MT_SOCK": dep.milter_spec, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120, check=False)


def test_miltertest_drives_the_milter(milter_only: MilterDeployment) -> None:
    proc = run_miltertest(milter_only, MILTERTEST_SCRIPT)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr
    log = milter_only.filter_log.read_text()
    assert "rcpt=<nosuchlist@lists.example.org> rejected at RCPT: 550 5.1.1" in log
    assert "milter eom failed" not in log  # the crash is the handler's, answered by App.process
    assert "rcpt=crash@lists.example.org tempfail: RuntimeError" in log and "decision=tempfail" in log


def test_sighup_reloads_and_sigterm_stops_cleanly(milter_only: MilterDeployment) -> None:
    dep = milter_only
    assert dep.filter_proc is not None
    proc = dep.filter_proc
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in dep.filter_log.read_text(), 30, message="the reload log line")
    assert proc.poll() is None
    result = run_miltertest(dep, MILTERTEST_SCRIPT)  # still serving, with the reloaded app
    assert result.returncode == 0, result.stdout + result.stderr
    assert dep.stop_filter() == 0  # SIGTERM: clean stop, exit status 0
    assert "milter stopped" in dep.filter_log.read_text()
    assert not Path(dep.socket_path).exists()
