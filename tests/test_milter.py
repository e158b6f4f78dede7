"""lamsonfilter.milter without an MTA: callbacks driven by hand against a recording context.

The wire (Postfix, miltertest) is in tests/integration/test_milter.py and
test_scenarios.py; here each callback's contract is checked directly:
what it returns, which reply it sets, which actions it asks for.

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from lamsonfilter import App, Handler, stateless
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.mail import MailRequest
from lamsonfilter.memorystore import MemoryStorage
from tests.rig.fixtures import in_ci

try:
    import Milter

    import lamsonfilter.milter as milter_mode
    from lamsonfilter.milterparts import callbacks as milter_callbacks
    from tests.rig.milterdrive import RecordingCtx, connect, feed
except ImportError as exc:  # pymilter is an optional extra; CI must have it
    if in_ci():
        raise
    pytest.skip(f"pymilter is not installed ({exc}); run scripts/bootstrap.sh", allow_module_level=True)

LamsonMilter = milter_mode.LamsonMilter

HOST = "lists.example.org"


def make_runtime() -> Runtime:
    handler = Handler("t", default_action="deliver")

    @handler.route("tag@(host)")
    @stateless
    def TAG(ctx: Any, host: str) -> None:
        ctx.add_header("X-Tag", "tagged")
        ctx.add_header("X-Greeting", "grüße")  # not ASCII: RFC 2047 on the wire

    @handler.route("crash@(host)")
    @stateless
    def CRASH(ctx: Any, host: str) -> None:
        raise RuntimeError("boom")

    @handler.route("eat@(host)")
    @stateless
    def EAT(ctx: Any, host: str) -> None:
        ctx.drop()

    @handler.route("refuse@(host)")
    @stateless
    def REFUSE(ctx: Any, host: str) -> None:
        ctx.reject("100% not wanted here", 550, "5.7.1")

    @handler.route("hold@(host)")
    @stateless
    def HOLD(ctx: Any, host: str) -> None:
        ctx.quarantine("looks odd")

    app = App(hosts=[HOST], handlers=[handler], storage=MemoryStorage()).start()
    return Runtime(app)  # no relay: no outbox worker


class Spy(Runtime):
    """A Runtime that keeps the requests it was given."""

    def __init__(self) -> None:
        inner = make_runtime()
        super().__init__(inner.app)
        self.requests: list[MailRequest] = []

    def process(self, request: MailRequest, **contract: Any) -> Any:
        self.requests.append(request)
        return super().process(request, **contract)


# ---------------------------------------------------------------- negotiation
def test_negotiates_only_the_actions_the_plan_uses_and_the_steps_it_needs() -> None:
    m = LamsonMilter(make_runtime())
    ctx = RecordingCtx()
    m._setctx(ctx)
    opts = [Milter.CURR_ACTS | Milter.ADDRCPT_PAR, 0x1FFFFF, 0, 0]
    assert m.negotiate(opts) == Milter.CONTINUE
    assert opts[0] == milter_mode.FLAGS and not opts[0] & Milter.ADDRCPT_PAR
    steps = opts[1]
    for wanted in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOMAIL, Milter.P_NORCPT,
                   Milter.P_NOHDRS, Milter.P_NOEOH, Milter.P_NOBODY):
        assert not steps & wanted  # these callbacks run
    assert not steps & Milter.P_NODATA  # DATA is answered (see LamsonMilter.data)
    assert steps & Milter.P_NOUNKNOWN  # unknown commands are not
    assert steps & Milter.P_HDR_LEADSPC  # exact header bytes
    assert steps & Milter.P_NR_CONN and steps & Milter.P_NR_HELO  # Postfix does not wait there
    assert steps & Milter.P_NR_HDR and steps & Milter.P_NR_EOH and steps & Milter.P_NR_BODY  # nor here
    assert not steps & (Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_DATA)  # these can refuse
    assert not steps & Milter.P_RCPT_REJ
    assert sorted(ctx.named("setsymlist")) == sorted([
        (Milter.M_CONNECT, "{client_addr} {client_name}"), (Milter.M_DATA, "i"), (Milter.M_EOM, "i")])


def test_every_action_the_plan_table_can_ask_for_is_negotiated() -> None:
    source = (Path(milter_mode.__file__).parent / "milterparts" / "plan.py").read_text()
    methods = set(re.findall(r'MilterAction\("(\w+)"', source))
    assert methods and methods <= set(milter_mode.ACTION_FLAGS)


# ---------------------------------------------------------------- the request
def test_message_is_rebuilt_byte_for_byte_with_crlf() -> None:
    spy = Spy()
    m, _ctx = connect(spy)
    rc = feed(m, [f"tag@{HOST}"], [
        ("From", b" Alice <alice@example.com>"),
        ("Subject", b" folded\n\tsecond line"),  # Postfix joins continuation lines with LF
        ("X-Tight", b"no-space"),
        ("X-Raw", b" caf\xc3\xa9 \xff"),  # 8-bit and even invalid UTF-8 pass unchanged
    ], [b"line 1\r\n", b"line 2\r\n"])
    assert rc == Milter.ACCEPT
    (req,) = spy.requests
    assert req.raw == (b"From: Alice <alice@example.com>\r\nSubject: folded\r\n\tsecond line\r\n"
                       b"X-Tight:no-space\r\nX-Raw: caf\xc3\xa9 \xff\r\n\r\nline 1\r\nline 2\r\n")
    env = req.envelope
    assert (env.sender, env.recipients, env.queue_id) == ("alice@example.com", (f"tag@{HOST}",), "4QID")
    assert (env.client_address, env.client_name, env.helo) == ("192.0.2.7", None, "client.example.test")


def test_without_leading_space_the_header_gets_the_usual_single_space() -> None:
    spy = Spy()
    m, _ctx = connect(spy, leadspc=False)
    feed(m, [f"tag@{HOST}"], [("Subject", b"hi")], [b"x\r\n"])
    assert spy.requests[0].raw.startswith(b"Subject: hi\r\n\r\n")


def test_large_message_spools_to_disk_and_comes_back_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy()
    m, _ctx = connect(spy)
    m.spool_threshold = 1024
    seen: list[bool] = []
    original = milter_callbacks.Spool.getvalue

    def getvalue(self: Any) -> bytes:
        seen.append(self.in_memory)
        return original(self)

    monkeypatch.setattr(milter_callbacks.Spool, "getvalue", getvalue)
    chunk = b"x" * 998 + b"\r\n"
    feed(m, [f"tag@{HOST}"], [("Subject", b" big")], [chunk] * 100)
    assert seen == [False]  # on disk
    assert spy.requests[0].raw == b"Subject: big\r\n\r\n" + chunk * 100


def test_state_is_reset_at_each_mail_from_and_on_abort() -> None:
    spy = Spy()
    m, ctx = connect(spy)
    feed(m, [f"tag@{HOST}", "bob@example.net"], [("Subject", b" one")], [b"1\r\n"])
    assert m.abort() == Milter.CONTINUE  # Postfix sends ABORT after every transaction
    feed(m, [f"tag@{HOST}"], [("Subject", b" two")], [b"2\r\n"])
    first, second = spy.requests
    assert first.recipients == (f"tag@{HOST}", "bob@example.net")
    assert second.recipients == (f"tag@{HOST}",) and second.raw == b"Subject: two\r\n\r\n2\r\n"
    assert m.abort() == Milter.CONTINUE
    # data without MAIL FROM: logged, and refused at end of message (no reply to a header)
    assert m.header_bytes("Subject", b" orphan") == Milter.NOREPLY
    assert m.eom() == Milter.TEMPFAIL
    assert ctx.named("setreply")[-1] == ("451", "4.3.0", "Temporary failure, try again later")


def test_unrouted_mail_is_decided_at_data_without_its_content() -> None:
    spy = Spy()
    m, ctx = connect(spy)
    assert feed(m, ["bob@example.net", "carol@example.org"], [("Subject", b" x")], [b"x\r\n"]) == Milter.ACCEPT
    (req,) = spy.requests  # logged once, like every message
    assert req.raw == b"" and req.recipients == ("bob@example.net", "carol@example.org")
    assert req.queue_id == "4QID" and ctx.named("setreply") == []
    assert m._tx is None  # ACCEPT ends the transaction: no header or body follows


def test_a_client_retry_replays_the_committed_decision_instead_of_replying_again() -> None:
    """M4: a retry after a 4xx is a new transaction with a new queue id; the replay key is
    Message-ID + envelope, so the reply the first attempt committed is not made twice."""
    handler = Handler("auto", default_action="deliver")

    @handler.route("auto@(host)")
    @stateless
    def AUTO(ctx: Any, host: str) -> None:
        ctx.reply(body="got it", subject="Re: hello")

    app = App(hosts=[HOST], handlers=[handler], storage=MemoryStorage()).start()
    decisions: list[Any] = []

    class Keep(Runtime):
        def process(self, request: MailRequest, **contract: Any) -> Any:
            decisions.append(super().process(request, **contract))
            return decisions[-1]

    runtime = Keep(app)
    headers = [("Message-ID", b" <retry-1@client.example.test>"), ("Subject", b" hello")]
    for queue_id in ("4QFIRST", "4QRETRY"):
        m, _ = connect(runtime, macros={"i": queue_id})
        assert feed(m, [f"auto@{HOST}"], headers, [b"hi\r\n"]) == Milter.ACCEPT
    first, retry = decisions
    assert len(first.outbox) == 1 and retry.outbox == ()
    assert "retry: decision replayed" in retry.notes
    m, _ = connect(runtime, macros={"i": "4QOTHER"})  # another message from the same client replies
    assert feed(m, [f"auto@{HOST}"], [("Message-ID", b" <other@client.example.test>")], [b"x\r\n"]) == Milter.ACCEPT
    assert "retry: decision replayed" not in decisions[-1].notes


def test_a_malformed_sender_is_refused_with_501_not_tempfailed() -> None:
    m, ctx = connect(make_runtime())
    assert m.envfrom("<" + "x" * 330 + "@client.example.test>") == Milter.REJECT
    assert ctx.named("setreply")[-1][:2] == ("501", "5.1.7")


# ---------------------------------------------------------------- RCPT time
def test_unroutable_address_at_the_apps_host_is_refused_at_rcpt() -> None:
    m, ctx = connect(make_runtime())
    assert m.envfrom("<alice@example.com>") == Milter.CONTINUE
    assert m.envrcpt(f"<nosuch@{HOST}>") == Milter.REJECT
    assert ctx.named("setreply") == [("550", "5.1.1", "No such address here")]
    assert m.envrcpt(f"<tag@{HOST}>") == Milter.CONTINUE
    assert m.envrcpt("<someone@example.net>") == Milter.CONTINUE  # not ours: untouched
    assert m._tx.recipients == [f"tag@{HOST}", "someone@example.net"]


# ---------------------------------------------------------------- end of message
def test_header_actions_carry_the_leading_space_and_rfc2047() -> None:
    m, ctx = connect(make_runtime())
    assert feed(m, [f"tag@{HOST}"], [("Subject", b" hi")], [b"x\r\n"]) == Milter.ACCEPT
    added = ctx.named("addheader")
    assert added[0] == ("X-Tag", " tagged", -1)
    assert added[1][0] == "X-Greeting" and added[1][1] == " =?utf-8?b?Z3LDvMOfZQ==?="


def test_consumed_message_is_discarded() -> None:
    m, ctx = connect(make_runtime())
    assert feed(m, [f"eat@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.DISCARD
    assert ctx.named("setreply") == []


def test_reject_reply_has_its_percent_doubled() -> None:
    m, ctx = connect(make_runtime())
    assert feed(m, [f"refuse@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.REJECT
    assert ctx.named("setreply") == [("550", "5.7.1", "100%% not wanted here")]


def test_quarantine_is_an_action_then_accept() -> None:
    m, ctx = connect(make_runtime())
    assert feed(m, [f"hold@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.ACCEPT
    assert ctx.named("quarantine") == [("looks odd",)]


def test_handler_error_is_a_plain_451() -> None:
    m, ctx = connect(make_runtime())
    assert feed(m, [f"crash@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.TEMPFAIL
    assert ctx.named("setreply") == [("451", "4.3.0", "Temporary failure, try again later")]
    assert ctx.named("addheader") == []


def test_any_exception_in_a_callback_is_451_with_one_log_line(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    m, ctx = connect(make_runtime())
    m.envfrom("<alice@example.com>")
    m.envrcpt(f"<tag@{HOST}>")

    def disk_full(self: Any, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(milter_callbacks.Spool, "write", disk_full)
    with caplog.at_level(logging.ERROR, logger="lamsonfilter.milter"):
        assert m.data() == Milter.CONTINUE
        # Postfix does not wait for the header step's reply: the failure is kept and
        # the message refused at end of message, the one log line written when it happened
        assert m.header_bytes("Subject", b" x") == Milter.NOREPLY
        assert m.eoh() == Milter.NOREPLY
        assert m.eom() == Milter.TEMPFAIL
    assert ctx.named("setreply")[-1] == ("451", "4.3.0", "Temporary failure, try again later")
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith("queue_id=4QID milter header failed, answering 451 4.3.0: OSError")


def test_a_failure_without_reply_defers_the_next_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    m = LamsonMilter(make_runtime())
    ctx = RecordingCtx()
    m._setctx(ctx)
    m.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
    assert m.connect("[192.0.2.7]", 2, object()) == Milter.NOREPLY  # hostaddr unusable, macro missing...
    monkeypatch.setattr(LamsonMilter, "getsymval", lambda self, name: 1 / 0)
    assert m.connect("[192.0.2.7]", 2, object()) == Milter.NOREPLY  # ...and now failing: no reply possible
    assert m.envfrom("<alice@example.com>") == Milter.TEMPFAIL  # so the transaction is deferred
    assert ctx.named("setreply")[-1] == ("451", "4.3.0", "Temporary failure, try again later")


def test_the_application_runs_in_the_executors_threads_not_libmilters() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    spy = Spy()
    seen: list[str] = []
    original = spy.process

    def process(request: MailRequest, **contract: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(request, **contract)

    spy.process = process  # type: ignore[method-assign]
    with ThreadPoolExecutor(2, thread_name_prefix="app") as pool:
        m = LamsonMilter(spy, executor=pool)
        ctx = RecordingCtx({"i": "4QID"})
        m._setctx(ctx)
        m.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
        assert feed(m, [f"tag@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.ACCEPT
        assert feed(m, ["bob@example.net"], [], []) == Milter.ACCEPT  # no route: decided at DATA, inline
    assert len(seen) == 2 and seen[0].startswith("app") and not seen[1].startswith("app"), seen
    assert ctx.named("addheader")[0][:2] == ("X-Tag", " tagged")


def test_an_application_past_its_deadline_is_451(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The callback stops waiting at APP_DEADLINE + COMMIT_GRACE: 451 while the application still runs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Event()
    spy = Spy()
    spy.process = lambda request, **contract: gate.wait(5)  # type: ignore[assignment,method-assign]
    monkeypatch.setattr(milter_callbacks, "APP_DEADLINE", 0.05)
    monkeypatch.setattr(milter_callbacks, "COMMIT_GRACE", 0.0)
    pool = ThreadPoolExecutor(1, thread_name_prefix="t")
    try:
        m = LamsonMilter(spy, executor=pool)
        ctx = RecordingCtx({"i": "5QID"})
        m._setctx(ctx)
        m.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
        with caplog.at_level(logging.ERROR, logger="lamsonfilter.milter"):
            assert feed(m, [f"tag@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.TEMPFAIL
        assert ctx.named("setreply")[-1] == ("451", "4.3.0", "Temporary failure, try again later")
        assert not gate.is_set()  # answered while the application was still running
        assert "queue_id=5QID milter eom failed" in caplog.text and "took more than 0.05 s" in caplog.text
    finally:
        gate.set()
        pool.shutdown(wait=True)


def test_a_failing_action_is_also_451(monkeypatch: pytest.MonkeyPatch) -> None:
    m, ctx = connect(make_runtime())

    def refused(self: Any, *args: Any) -> None:
        raise Milter.error("cannot add header")

    monkeypatch.setattr(LamsonMilter, "addheader", refused)
    assert feed(m, [f"tag@{HOST}"], [("Subject", b" x")], [b"x\r\n"]) == Milter.TEMPFAIL
    assert ctx.named("setreply")[-1] == ("451", "4.3.0", "Temporary failure, try again later")
