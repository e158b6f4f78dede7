"""Content-filter limits and the poison-message quarantine, through a real private Postfix.

Issue #5, checklist IDs (docs/reliability.rst):

=====  =========================================================================
R15    a message that kills the filter process is quarantined after
       ``POISON_LIMIT`` attempts, answered 250, gone from the queue, no DSN;
       one whose handler always raises or always outlasts the deadline stays
       deferred in Postfix's queue past that limit; other mail keeps flowing
R6     strace: the state commit (outbox) and the quarantine copy are fsynced
       before the ``250`` reaches Postfix; kill -9 after that 250 → the pending
       outbox reply is sent after the restart, once
R7     the filter announces SIZE ≥ message_size_limit; a message of
       message_size_limit − 1 KiB is delivered (no 5.3.4); 20 such in parallel
       keep the filter's peak RSS under a cap derived from the spool threshold;
       a 200 MiB line without CRLF straight to the filter port is cut off early
R8     UTF-8 envelope (SMTPUTF8) and a UTF-8 Subject → delivered, no DSN
R11    a handler writes LF-only text (body rewrite, new message); the reinjection
       listener runs ``smtpd_forbid_bare_newline = reject`` → both delivered
R12    3 recipients, the reinjection listener refuses one: with the shipped
       configuration the whole message is deferred (nothing half-delivered);
       with ``lamsonfilter_destination_recipient_limit = 1`` the two others are
       delivered once and the third stays deferred; lifted → delivered once
=====  =========================================================================

One deployment (`LimitsDeployment`: the shipped content-filter configuration,
``message_size_limit`` lowered to 5 MiB to keep the large tests quick, the
reinjection listener with ``smtpd_forbid_bare_newline = reject`` and a
``check_recipient_access`` map the tests edit) serves the whole module.
Postfix's retries are driven by the rig's short backoff (3-6 s); every wait
is bounded.
"""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamsonfilter.contentfilter.reinjector import IDLE_LIMIT
from lamsonfilter.contentfilter.spool import DataLimits
from lamsonfilter.daemon.poison import AttemptLog
from tests.rig.deploy import LIST_HOST
from tests.rig.deploy_smtpproxy import MASTER_CF, SmtpproxyDeployment
from tests.rig.fixtures import require
from tests.rig.modes import started
from tests.rig.postfix import CapturedMessage, wait_for
from tests.rig.submission import SendResult

MiB = 1 << 20
#: Postfix's message_size_limit in this deployment (the property is the ratio, not the size).
SIZE_LIMIT = 5 * MiB
#: Attempts before a poison message is quarantined (settings.POISON_LIMIT).
POISON_LIMIT = 3
#: The filter's per-message deadline (--deadline) and how long the "slow" handler sleeps.
DEADLINE = 6.0
WAIT = 120.0



class LimitsDeployment(SmtpproxyDeployment):
    """The shipped content-filter set-up plus the knobs this module needs (see the module docstring)."""

    extra_handlers = ("lflimits",)  # tests/fixtures/handlers/lflimits.py
    extra_settings = f"POISON_LIMIT = {POISON_LIMIT}\nLFLIMITS_SLEEP = {DEADLINE + 2}\n"

    def __init__(self) -> None:
        super().__init__()
        self.access = self.workdir / "reinject_access"
        self.access.write_text("")

    def filter_command(self) -> list[str]:
        return [*super().filter_command(), "--deadline", str(DEADLINE)]

    def postfix_main_cf(self) -> dict[str, str | None]:
        params = super().postfix_main_cf()
        params["message_size_limit"] = str(SIZE_LIMIT)
        return params

    def postfix_master_cf(self) -> str:
        text = super().postfix_master_cf()
        shipped = "    -o smtpd_recipient_restrictions=permit_mynetworks,reject\n"
        assert shipped in text, f"{MASTER_CF}: the reinjection listener's restrictions changed"
        return text.replace(shipped, (
            f"    -o smtpd_recipient_restrictions=check_recipient_access,texthash:{self.access},"
            "permit_mynetworks,reject\n"
            "    -o smtpd_forbid_bare_newline=reject\n"
            "    -o smtpd_forbid_bare_newline_exclusions=\n"
        ))

    # ------------------------------------------------------------ helpers
    def set_access(self, entries: dict[str, str]) -> None:
        """Rewrite the reinjection listener's recipient map and reload Postfix (new smtpd processes)."""
        self.access.write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
        self.pf.reload()
        # a connection the filter keeps for reuse still talks to an smtpd started before the
        # reload (old map); it is closed after IDLE_LIMIT without traffic
        time.sleep(IDLE_LIMIT + 1.0)

    def queue_id(self, result: SendResult) -> str:
        self.assert_accepted(result)
        assert result.final is not None
        m = re.search(r"queued as ([0-9A-Za-z]+)", result.final.text)
        assert m, f"no queue id in {result.final}"
        return m.group(1)

    def log_lines(self, queue_id: str, pattern: str) -> list[str]:
        return [line for line in self.pf.maillog().splitlines()
                if f"{queue_id}: " in line and re.search(pattern, line)]

    def wait_sent(self, queue_id: str, timeout: float = WAIT) -> None:
        relay = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{self.filter_port},.*status=sent"
        wait_for(lambda: self.log_lines(queue_id, relay), timeout,
                 message=lambda: f"{queue_id} accepted by the filter; {self.diagnostics()}")

    def in_queue(self, queue_id: str) -> bool:
        return queue_id in {str(q["queue_id"]) for q in self.pf.queue()}

    def dsns(self) -> list[CapturedMessage]:
        return [m for m in self.capture.messages if "MAILER-DAEMON" in str(m.message.get("From", ""))]

    def quarantined(self) -> list[bytes]:
        new = self.app_dir / "var" / "quarantine" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def attempts(self) -> list[Path]:
        d = self.app_dir / "var" / "attempts"
        return [p for p in d.iterdir() if not p.name.endswith(".tmp")] if d.is_dir() else []

    def filter_rss(self, reset_peak: bool = False) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the filter process in bytes; `reset_peak` first resets VmHWM to VmRSS."""
        assert self.filter_proc is not None
        if reset_peak:  # proc(5) clear_refs: "5" resets the peak resident set size
            Path(f"/proc/{self.filter_proc.pid}/clear_refs").write_text("5")
        status = Path(f"/proc/{self.filter_proc.pid}/status").read_text()
        values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
        return int(values["VmRSS"]) * 1024, int(values["VmHWM"]) * 1024

    def send_raw(self, sender: str, rcpts: list[str], raw: bytes, options: list[str]) -> str | None:
        """One transaction of preformatted bytes (smtplib turns LF into CRLF); the problem, or None."""
        try:
            with smtplib.SMTP("127.0.0.1", self.pf.smtpd_port, local_hostname="client.example.test",
                              timeout=120) as smtp:
                smtp.ehlo()
                refused = smtp.sendmail(sender, rcpts, raw, mail_options=options)
                return f"refused: {refused}" if refused else None
        except (smtplib.SMTPException, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def dep() -> Iterator[LimitsDeployment]:
    with started(LimitsDeployment()) as d:
        yield d


def body(size: int) -> str:
    """Printable text of about `size` bytes in 77-byte lines (CRLF on the wire)."""
    line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab"
    return (line + "\n") * max(1, size // (len(line) + 2))


# ---------------------------------------------------------------------------- R15
@pytest.mark.postfix
def test_handler_that_always_raises_stays_deferred_while_other_mail_flows(dep: LimitsDeployment) -> None:
    """R15: handler always raises → 451 at every attempt, past POISON_LIMIT; never quarantined, no DSN
    (a broken deploy keeps the mail in Postfix's queue until the handler is fixed)."""
    subject = f"poison {uuid.uuid4().hex}"
    qid = dep.queue_id(dep.send("alice@example.com", [f"poison@{LIST_HOST}"], subject, "bad\n"))
    wait_for(lambda: dep.log_lines(qid, r"status=deferred.*451 4\.3\.0"), WAIT,
             message=lambda: f"first deferral of {qid}; {dep.diagnostics()}")
    # normal mail while the poison message is being retried
    normal = [(f"tag@{LIST_HOST}" if i % 2 else f"bob{i}@example.net", f"normal {i} {uuid.uuid4().hex}")
              for i in range(6)]
    results: list[SendResult] = []
    threads = [threading.Thread(target=lambda r=r, s=s: results.append(dep.send("carol@example.com", [r], s)))
               for r, s in normal]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 6 and all(r.accepted for r in results), [str(r) for r in results]
    for rcpt, subj in normal:
        assert len(dep.wait_for_mail(rcpt, subj)) == 1
    wait_for(lambda: len(dep.log_lines(qid, r"status=deferred.*451 4\.3\.0")) > POISON_LIMIT, WAIT,
             message=lambda: f"{POISON_LIMIT + 1} deferrals of {qid}; {dep.diagnostics()}")
    try:
        assert dep.in_queue(qid)
        assert not [q for q in dep.quarantined() if subject.encode() in q]
        assert not re.search(rf"queue_id={qid} quarantined as ", dep.filter_log.read_text())
        assert not dep.messages_to(f"poison@{LIST_HOST}") and not dep.dsns()
    finally:
        dep.pf._run("postsuper", "-d", qid)  # the module's deployment goes on without it


@pytest.mark.postfix
def test_message_that_kills_the_filter_is_quarantined_after_k_kills(dep: LimitsDeployment) -> None:
    """R15: "crash" includes the process dying in the handler: the attempt was recorded before."""
    subject = f"die {uuid.uuid4().hex}"
    qid = dep.queue_id(dep.send("alice@example.com", [f"die@{LIST_HOST}"], subject, "lethal\n"))
    kills = 0
    for _ in range(POISON_LIMIT + 2):  # bounded: k kills are expected, then the quarantine
        proc = dep.filter_proc
        assert proc is not None
        wait_for(lambda p=proc: p.poll() is not None or dep.log_lines(qid, r"status=sent"), WAIT,
                 message=lambda: f"{qid} to kill the filter or be accepted; {dep.diagnostics()}")
        if proc.poll() is None:
            break
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        kills += 1
        dep.start_filter()
    dep.wait_sent(qid)
    assert kills == POISON_LIMIT, f"{kills} kills; {dep.diagnostics()}"
    kept = [q for q in dep.quarantined() if subject.encode() in q]
    assert len(kept) == 1 and f"X-Lamsonfilter-Queue-Id: {qid}\r\n".encode() in kept[0]
    assert not dep.in_queue(qid)
    dep.settle()
    assert not dep.messages_to(f"die@{LIST_HOST}") and not dep.dsns()


@pytest.mark.postfix
def test_message_that_always_times_out_stays_deferred(dep: LimitsDeployment) -> None:
    """R15: a handler that always outlasts the deadline → 451 at every attempt, past POISON_LIMIT;
    the process lives on, so the message is not poison: it stays in Postfix's queue."""
    subject = f"stuck {uuid.uuid4().hex}"
    qid = dep.queue_id(dep.send("alice@example.com", [f"stuck@{LIST_HOST}"], subject, "slow\n"))
    wait_for(lambda: len(dep.log_lines(qid, r"status=deferred.*451 4\.3\.0")) > POISON_LIMIT,
             (POISON_LIMIT + 1) * (DEADLINE + 30) + WAIT,
             message=lambda: f"{POISON_LIMIT + 1} deferrals of {qid}; {dep.diagnostics()}")
    try:
        timeouts = [line for line in dep.filter_log.read_text().splitlines()
                    if f"queue_id={qid} deadline" in line]
        assert len(timeouts) > POISON_LIMIT, dep.diagnostics()
        assert dep.in_queue(qid)
        assert not [q for q in dep.quarantined() if subject.encode() in q]
        assert not dep.messages_to(f"stuck@{LIST_HOST}") and not dep.dsns()
    finally:
        dep.pf._run("postsuper", "-d", qid)


# ---------------------------------------------------------------------------- R6
def _trace(dep: LimitsDeployment, out: Path) -> subprocess.Popen[bytes]:
    require("strace")
    assert dep.filter_proc is not None
    with open(out.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(
            ["strace", "-f", "-yy", "-tt", "-s", "200", "-o", str(out), "-p", str(dep.filter_proc.pid),
             "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,write,sendto,sendmsg"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )
    # attached once strace reports the first syscall or says so on stderr; a marker
    # connection makes the asyncio loop run a syscall we can see
    def attached() -> bool:
        socket.create_connection(("127.0.0.1", dep.filter_port), timeout=5).close()
        return out.exists() and out.stat().st_size > 0
    wait_for(attached, 30, interval=0.3, message="strace to attach to the filter")
    return proc


def _final_replies(lines: list[str], port: int) -> list[int]:
    """Indices of the replies to Postfix's final dot: the first 250 written after each 354."""
    upstream = re.compile(rf"<TCP:\[127\.0\.0\.1:{port}->")
    found, after_354 = [], False
    for i, line in enumerate(lines):
        if not upstream.search(line) or not re.search(r"(write|sendto)\(", line):
            continue
        if "354 End data" in line:
            after_354 = True
        elif after_354 and re.search(r'\]>, "250 ', line):
            found.append(i)
            after_354 = False
    return found


@pytest.mark.postfix
def test_commit_and_quarantine_are_fsynced_before_250_and_outbox_survives_kill(dep: LimitsDeployment) -> None:
    """R6: strace order; then kill -9 right after the 250 → the pending reply goes out after restart."""
    member = f"paused-{uuid.uuid4().hex[:8]}@example.com"
    dep.set_access({member: "450 4.7.1 outbox paused by the test"})  # the reply waits in the outbox
    out = dep.workdir / "strace.out"
    tracer = _trace(dep, out)
    try:
        sub = dep.queue_id(dep.send(member, [f"python-subscribe@{LIST_HOST}"], "subscribe me", "please\n"))
        dep.wait_sent(sub)
        kept = dep.queue_id(dep.send("alice@example.com", [f"keep@{LIST_HOST}"], f"keep {uuid.uuid4().hex}"))
        dep.wait_sent(kept)
    finally:
        tracer.send_signal(signal.SIGTERM)  # strace detaches from the filter and exits
        tracer.wait(30)
    lines = out.read_text(errors="replace").splitlines()
    finals = _final_replies(lines, dep.filter_port)
    assert len(finals) == 2, f"two final 250 replies expected in the trace, found {len(finals)}"
    first, second = lines[:finals[0]], lines[finals[0] + 1:finals[1]]
    state = r"state\.db(-wal|-journal)?>"
    assert any(re.search(rf"(fsync|fdatasync)\(\d+<[^>]*{state}", x) for x in first), \
        "no fsync of the state database (decision + outbox) before the 250 of the subscribe request"
    qdir = re.escape(str(dep.app_dir / "var" / "quarantine"))
    steps = [
        next((i for i, x in enumerate(second) if re.search(rf"fsync\(\d+<{qdir}/tmp/", x)), None),
        next((i for i, x in enumerate(second) if re.search(rf'rename(?:at2?)?\((?:AT_FDCWD, )?"{qdir}/tmp/[^"]+", (?:AT_FDCWD, )?"{qdir}/new/', x)), None),
        next((i for i, x in enumerate(second) if re.search(rf"fsync\(\d+<{qdir}/new>", x)), None),
    ]
    assert None not in steps and steps == sorted(steps), \
        f"quarantine: fsync(tmp) < rename < fsync(new/) before the 250 expected, got {steps}"
    print(f"R6: {len(lines)} traced syscalls; final 250s at lines {finals}; quarantine fsync/rename/fsync "
          f"at {[finals[0] + 1 + i for i in steps if i is not None]}")

    # the 250 reached Postfix (status=sent); the reply could not leave yet (450 at RCPT)
    wait_for(lambda: re.search(rf"reject: RCPT .*450 4\.7\.1 <{re.escape(member)}>", dep.pf.maillog()), WAIT,
             message=lambda: f"the outbox to try and be refused; {dep.diagnostics()}")
    assert not dep.messages_to(member)
    dep.kill_filter()
    dep.set_access({})
    dep.start_filter()
    dep.wait_for_mail(member, subject_contains="Confirm your subscription")
    dep.settle()
    assert len(dep.messages_to(member, "Confirm your subscription")) == 1


# ---------------------------------------------------------------------------- R7
def _ehlo_size(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="probe.example.test", timeout=30) as s:
        s.ehlo()
        return int(s.esmtp_features.get("size", "0"))


@pytest.mark.postfix
def test_size_limit_minus_1k_is_delivered_and_parallel_big_messages_keep_rss_bounded(dep: LimitsDeployment) -> None:
    """R7: SIZE ≥ message_size_limit; limit − 1 KiB delivered, no 5.3.4; 20 in parallel under the RSS cap."""
    limit = int(dep.pf.postconf("-h", "message_size_limit").strip())
    assert limit == SIZE_LIMIT
    announced = _ehlo_size(dep.filter_port)
    assert announced >= limit, f"the filter announces SIZE {announced} < message_size_limit {limit}: 5.3.4 bounces"

    size = limit - 1024
    subject = f"big {uuid.uuid4().hex}"
    text = body(size - 600)  # 600: the headers smtplib and EmailMessage add
    qid = dep.queue_id(dep.send("alice@example.com", [f"tag@{LIST_HOST}"], subject, text))
    (got,) = dep.wait_for_mail(f"tag@{LIST_HOST}", subject)
    assert limit - 8 * 1024 < len(got.data) < limit + 4 * 1024, len(got.data)
    assert not dep.log_lines(qid, r"5\.3\.4|status=bounced")

    # 20 in parallel, to addresses no route takes: the filter streams them from its spool
    rss_before, _ = dep.filter_rss(reset_peak=True)
    maxproc = int(re.search(r"^lamsonfilter\s+unix\s+\S+\s+\S+\s+\S+\s+\S+\s+(\d+)\s", MASTER_CF.read_text(),
                            re.MULTILINE).group(1))  # type: ignore[union-attr]
    limits = DataLimits(max_size=10_240_000)
    # per connection: the in-RAM spool threshold, the reader's buffer and one line, the
    # reinjector's 256 KiB chunk with its stuffed copy; plus allocator slack
    per_connection = limits.memory + 2 * 65536 + limits.max_line + 2 * (1 << 18)
    cap = rss_before + maxproc * per_connection + 24 * MiB
    tag = uuid.uuid4().hex
    results: list[SendResult] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        dep.send("alice@example.com", [f"big{i}@example.net"], f"big {tag} {i}", text))) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 20 and all(r.accepted for r in results), [str(r) for r in results if not r.accepted]
    for i in range(20):
        dep.wait_for_mail(f"big{i}@example.net", f"big {tag} {i}", timeout=180)
    rss_after, hwm = dep.filter_rss()
    print(f"R7: filter RSS before {rss_before / MiB:.1f} MiB, peak {hwm / MiB:.1f} MiB, after "
          f"{rss_after / MiB:.1f} MiB; cap {cap / MiB:.1f} MiB (20 x {size / MiB:.2f} MiB in flight)")
    assert hwm <= cap, f"peak RSS {hwm / MiB:.1f} MiB over the cap {cap / MiB:.1f} MiB"
    assert not re.search(r"5\.3\.4|status=bounced", dep.pf.maillog())
    assert not dep.dsns()


@pytest.mark.postfix
def test_largest_message_postfix_accepts_still_fits_the_reinjection_listener(dep: LimitsDeployment) -> None:
    """R7: a message just under message_size_limit, grown by Received: and a handler's header → delivered.

    Before the shipped master.cf gave the reinjection listener its own size limit, the
    10026 smtpd refused such a message (552 5.3.4) and it stayed deferred until it expired.
    """
    tag = uuid.uuid4().hex
    accepted: SendResult | None = None
    for slack in range(256, 2304, 128):  # bounded: from just under the limit downwards
        result = dep.send("alice@example.com", [f"tag@{LIST_HOST}"], f"edge {tag} {slack}",
                          body(SIZE_LIMIT - slack - 600))
        if result.accepted:
            accepted = result
            break
        assert result.final is not None and "5.3.4" in result.final.text, str(result)
    assert accepted is not None and slack > 256, "no size boundary found at Postfix's smtpd"
    qid = dep.queue_id(accepted)
    (got,) = dep.wait_for_mail(f"tag@{LIST_HOST}", f"edge {tag} {slack}")
    assert got.message["X-Lamsonfilter-Test"] == "tagged"
    assert not dep.log_lines(qid, r"status=(deferred|bounced)"), dep.log_lines(qid, "status=")
    print(f"R7: largest accepted message {len(got.data)} bytes at the destination "
          f"(message_size_limit {SIZE_LIMIT}); delivered without a deferral")


@pytest.mark.postfix
def test_200_mib_line_without_crlf_is_cut_off_early(dep: LimitsDeployment) -> None:
    """R7/F2: bounded send of a 200 MiB line straight to the filter; it replies 500 and closes early."""
    rss_before, hwm_before = dep.filter_rss(reset_peak=True)
    chunk = b"x" * MiB
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", dep.filter_port), timeout=30) as s:
        with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd
            f.readline()
            s.sendall(b"EHLO probe.example.test\r\n")
            for _ in range(50):  # the EHLO reply, bounded
                if f.readline()[3:4] in (b" ", b""):
                    break
            for cmd in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"):
                s.sendall(cmd + b"\r\n")
                assert f.readline()[:1] in (b"2", b"3")
            s.settimeout(5)
            try:
                while sent < 200 * MiB:  # bounded: at most 200 sends of 1 MiB
                    s.sendall(chunk)
                    sent += len(chunk)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                pass
            s.settimeout(10)
            try:
                reply = f.readline()
            except (TimeoutError, ConnectionResetError):
                reply = b""
    rss_after, hwm_after = dep.filter_rss()
    print(f"R7: 200 MiB line: sent {sent / MiB:.0f} MiB before the filter closed; reply {reply[:60]!r}; "
          f"RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB, peak {hwm_before / MiB:.1f} -> "
          f"{hwm_after / MiB:.1f} MiB")
    assert sent < 64 * MiB, f"the filter read {sent / MiB:.0f} MiB of one line before closing"
    assert reply == b"" or reply.startswith(b"500 5.5.2"), reply
    assert hwm_after <= max(hwm_before, rss_before + 16 * MiB)
    assert dep.filter_proc is not None and dep.filter_proc.poll() is None


# ---------------------------------------------------------------------------- R8
@pytest.mark.postfix
def test_utf8_envelope_and_subject_are_delivered(dep: LimitsDeployment) -> None:
    """R8: SMTPUTF8 local parts (routed and passed through) and a raw UTF-8 Subject; no DSN."""
    tag = uuid.uuid4().hex
    raw = (f"From: Jörg <jörg@example.com>\nTo: zoë@example.net\nSubject: Grüße {tag} ✓\n"
           f"Message-ID: <{tag}@example.com>\nMIME-Version: 1.0\n"
           "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nÄpfel\n").encode()
    problem = dep.send_raw("jörg@example.com", ["zoë@example.net", f"tag@{LIST_HOST}"], raw,
                           ["SMTPUTF8", "BODY=8BITMIME"])
    assert problem is None, problem
    (plain,) = dep.wait_for_mail("zoë@example.net", f"Grüße {tag}")
    (routed,) = dep.wait_for_mail(f"tag@{LIST_HOST}", f"Grüße {tag}")
    assert plain.mail_from == "jörg@example.com" and "Äpfel".encode() in plain.data
    assert routed.message["X-Lamsonfilter-Test"] == "tagged"
    dep.settle()
    assert not dep.dsns() and not re.search(r"strict ASCII|status=bounced", dep.pf.maillog())


# ---------------------------------------------------------------------------- R11
@pytest.mark.postfix
def test_lf_only_handler_output_passes_a_reinjection_listener_that_rejects_bare_lf(dep: LimitsDeployment) -> None:
    """R11: body rewrite and a generated message written with LF only are sent CRLF-only and delivered."""
    assert re.search(rf":{dep.relay_port}/inet/smtpd_forbid_bare_newline = reject$", dep.pf.postconf("-P"), re.MULTILINE)
    sender = f"lf-{uuid.uuid4().hex[:8]}@example.com"
    subject = f"lf {uuid.uuid4().hex}"
    dep.assert_accepted(dep.send(sender, [f"lf@{LIST_HOST}"], subject, "original\n"))
    (rewritten,) = dep.wait_for_mail(f"lf@{LIST_HOST}", subject)
    (notice,) = dep.wait_for_mail(sender, "lf-only notice")
    content = rewritten.message.get_content()
    assert "rewritten with bare LF\nsecond line\n.\nafter a lone dot\n" in content.replace("\r\n", "\n")
    assert "bare LF body" in notice.message.get_content()
    assert not re.search(r"bare <LF>|bare newline", dep.pf.maillog(), re.IGNORECASE)


# ---------------------------------------------------------------------------- R12
@pytest.mark.postfix
def test_one_recipient_refused_by_reinjection_listener_none_dropped(dep: LimitsDeployment) -> None:
    """R12: shipped config → whole message deferred; one recipient per delivery → 2 delivered, 1 deferred."""
    tag = uuid.uuid4().hex[:8]
    ok1, ok2, refused = f"r12a-{tag}@example.net", f"r12b-{tag}@example.net", f"r12c-{tag}@example.net"
    dep.set_access({refused: "550 5.7.1 refused by the reinjection listener"})
    subject = f"r12 {tag}"
    qid = dep.queue_id(dep.send("alice@example.com", [ok1, ok2, refused], subject))
    try:
        # the shipped configuration: one delivery for all three, one reply after DATA
        wait_for(lambda: len(dep.log_lines(qid, r"status=deferred.*451 4\.3\.0")) >= 3, WAIT,
                 message=lambda: f"{qid} deferred for all three; {dep.diagnostics()}")
        dep.settle()
        assert not dep.messages_to(ok1) and not dep.messages_to(ok2), "half-delivered"
        # one recipient per delivery (documented in conf/postfix/main.cf.content_filter)
        dep.pf.set_main_cf(lamsonfilter_destination_recipient_limit="1")
        dep.pf.reload()
        dep.wait_for_mail(ok1, subject)
        dep.wait_for_mail(ok2, subject)
        seen = len(dep.log_lines(qid, rf"to=<{refused}>.*status=deferred"))
        wait_for(lambda: len(dep.log_lines(qid, rf"to=<{refused}>.*status=deferred")) > seen, WAIT,
                 message=lambda: f"{refused} deferred alone; {dep.diagnostics()}")
        assert dep.in_queue(qid) and not dep.messages_to(refused)
        dep.set_access({})
        dep.wait_for_mail(refused, subject)
        wait_for(lambda: not dep.in_queue(qid), WAIT, message=lambda: f"{qid} to leave the queue")
        dep.settle()
    finally:
        dep.pf.set_main_cf(lamsonfilter_destination_recipient_limit=None)
        dep.pf.reload()
    assert [len(dep.messages_to(r, subject)) for r in (ok1, ok2, refused)] == [1, 1, 1]
    assert not dep.log_lines(qid, r"status=bounced") and not dep.dsns()


# ---------------------------------------------------------------------------- R15 units
def test_attempt_log_counts_durably_and_forgets(tmp_path: Path) -> None:
    """The count a restarted filter sees; forgive() undoes one attempt, clear() all, purge() old ones."""
    log = AttemptLog(tmp_path / "attempts")
    key = "ident:4XyzAbc:0123456789abcdef"
    assert [log.begin(key), log.begin(key), log.begin(key)] == [1, 2, 3]
    assert AttemptLog(tmp_path / "attempts").count(key) == 3  # a new process reads the same count
    log.forgive(key, 3)
    assert log.count(key) == 2 and log.count("ident:other:0") == 0
    log.clear(key)
    assert log.count(key) == 0 and not list((tmp_path / "attempts").iterdir())
    log.begin(key)
    assert log.purge(3600, now=time.time() + 7200) == 1 and log.count(key) == 0
