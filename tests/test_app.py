"""App.process: routing, the state machine, outcomes, commit and rollback, never raising."""

import logging

import pytest

from lamsonfilter import Action, App, Handler, MailRequest, StartupError, stateless
from lamsonfilter.memorystore import MemoryStorage
from lamsonfilter.testing import make_message


def request(sender="alice@example.com", to=("counter@app.example",), queue_id="Q1", **kw):
    raw = make_message(sender, to, **kw)
    return MailRequest.from_bytes(raw, sender=sender, recipients=to, queue_id=queue_id)


def counter_app(**kw):
    h = Handler("counter")

    @h.route("counter@(host)")
    def START(ctx, host):
        ctx.data["n"] = 1
        return COUNTING

    @h.state
    def COUNTING(ctx):
        ctx.data["n"] += 1
        if ctx.header("Subject") == "boom":
            raise RuntimeError("handler exploded")
        if ctx.header("Subject") == "later":
            ctx.tempfail("busy")
        if ctx.header("Subject") == "stop":
            return START
        return None

    @h.route("echo@(host)")
    @stateless
    def ECHO(ctx, host):
        ctx.add_header("X-Echo", host)
        ctx.deliver()

    return App(hosts=["app.example"], handlers=[h], route_defaults={"host": r"app\.example"}, **kw).start()


def state_of(app, key):
    with app.storage.transaction(commit=False) as tx:
        rec = tx.get(key)
    return rec


def test_state_function_returns_next_state_and_data_is_kept():
    app = counter_app()
    d1 = app.process(request())
    assert (d1.outcomes[0].state_before, d1.outcomes[0].state_after) == ("START", "COUNTING")
    assert d1.outcomes[0].action is Action.DROP  # routed mail is consumed by default
    assert d1.outcomes[0].route == "counter.START"
    app.process(request())
    rec = state_of(app, "counter:alice@example.com:counter@app.example")
    assert rec.state == "COUNTING" and rec.data == {"n": 2}


def test_default_key_separates_senders():
    app = counter_app()
    app.process(request(sender="a@x.example"))
    d = app.process(request(sender="b@x.example"))
    assert d.outcomes[0].state_before == "START"


def test_returning_start_with_no_data_clears_the_key():
    app = counter_app()
    app.process(request())
    app.process(request(subject="stop"))
    assert state_of(app, "counter:alice@example.com:counter@app.example").state == "START"


def test_exception_is_a_tempfail_with_one_log_line_and_nothing_committed(caplog):
    app = counter_app()
    app.process(request())
    with caplog.at_level(logging.ERROR, logger="lamsonfilter"):
        d = app.process(request(subject="boom", queue_id="4XyZ"))
    assert d.is_tempfail and d.kind == "tempfail"
    assert d.outcomes[0].code == 451 and d.outcomes[0].enhanced == "4.3.0"
    assert "handler exploded" not in (d.outcomes[0].text or "")  # no internals to the client
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "queue_id=4XyZ" in lines[0] and "counter.COUNTING" in lines[0]
    assert state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 1}


def test_a_stateless_handlers_failure_is_logged_with_its_own_name(caplog):
    h = Handler("lftest")

    @h.route("crash@app.example")
    @stateless
    def CRASH(ctx):
        raise RuntimeError("always")

    app = App(hosts=["app.example"], handlers=[h], storage=MemoryStorage()).start()
    with caplog.at_level(logging.ERROR, logger="lamsonfilter"):
        assert app.process(request(to=("crash@app.example",))).is_tempfail
    (line,) = [r.getMessage() for r in caplog.records]
    assert "handler=lftest.CRASH " in line and "START" not in line


def test_exception_moves_to_error_only_when_handler_has_error_state():
    h = Handler("h")

    @h.route("x@app.example")
    def START(ctx):
        raise ValueError("no")

    @h.state
    def ERROR(ctx):
        ctx.drop()

    app = App(handlers=[h]).start()
    d = app.process(request(to=("x@app.example",)))
    assert d.is_tempfail
    assert state_of(app, "h:alice@example.com:x@app.example").state == "ERROR"
    # in ERROR, the ERROR function runs
    d2 = app.process(request(to=("x@app.example",)))
    assert d2.outcomes[0].action is Action.DROP and d2.outcomes[0].state_before == "ERROR"


def test_without_error_state_the_key_stays_where_it_was():
    app = counter_app()
    app.process(request())
    app.process(request(subject="boom"))
    assert state_of(app, "counter:alice@example.com:counter@app.example").state == "COUNTING"


def test_handler_tempfail_commits_nothing():
    app = counter_app()
    app.process(request())
    d = app.process(request(subject="later"))
    assert d.is_tempfail and d.outcomes[0].text == "busy"
    assert state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 1}


def test_dry_run_reads_state_but_commits_nothing():
    app = counter_app()
    d = app.process(request(), commit=False)
    assert d.outcomes[0].state_after == "COUNTING"
    assert state_of(app, "counter:alice@example.com:counter@app.example") is None


def test_unrouted_recipients_at_app_hosts_are_rejected_others_delivered():
    app = counter_app()
    d = app.process(request(to=("nobody@app.example", "friend@other.example", "echo@app.example")))
    by = {o.recipient: o for o in d.outcomes}
    assert by["nobody@app.example"].action is Action.REJECT
    assert by["nobody@app.example"].reply == "550 5.1.1 No such address here"
    assert by["friend@other.example"].action is Action.DELIVER
    assert by["echo@app.example"].action is Action.DELIVER
    assert [h.name for h in d.header_changes] == ["X-Echo"]
    assert app.check_recipient("nobody@app.example").code == 550
    assert app.check_recipient("friend@other.example") is None
    assert app.check_recipient("counter@app.example") is None


def test_pass_through_mail_is_untouched_bytes():
    app = counter_app()
    req = request(to=("friend@other.example",))
    d = app.process(req)
    assert d.kind == "deliver" and d.apply(req.raw) is req.raw


def test_stateless_function_runs_in_any_state_and_changes_nothing():
    app = counter_app()
    d = app.process(request(to=("echo@app.example",)))
    assert d.outcomes[0].state_before is None and d.outcomes[0].state_after is None
    assert app.storage.pending_outbox() == []


def test_mail_loop_is_refused_without_running_handlers():
    app = counter_app(max_hops=3)
    raw = b"".join(b"Received: from x by y; Sun, 22 Nov 2026 00:00:00 +0000\r\n" for _ in range(4))
    raw += make_message("alice@example.com", "counter@app.example")
    req = MailRequest.from_bytes(raw, sender="alice@example.com", recipients=["counter@app.example"])
    d = app.process(req)
    assert d.outcomes[0].code == 554 and d.outcomes[0].enhanced == "5.4.6"
    assert state_of(app, "counter:alice@example.com:counter@app.example") is None


def test_custom_key_and_unknown_returned_state():
    h = Handler("k", key=lambda ctx: [ctx.args["user"]])

    @h.route("(user)@app.example")
    def START(ctx, user):
        ctx.data["seen"] = True
        return "NOWHERE" if user == "bad" else None

    app = App(handlers=[h]).start()
    d = app.process(request(to=("bad@app.example",)))
    assert d.is_tempfail and "NOWHERE" in d.error
    app.process(request(to=("good@app.example",)))
    assert state_of(app, "k:good").data == {"seen": True}
    assert state_of(app, "k:bad") is None


def test_startup_refuses_route_to_missing_state_naming_it():
    h = Handler("broken")
    h.add_route("x@app.example", "MISSING")
    with pytest.raises(StartupError, match=r"route 'x@app.example' leads to 'MISSING'"):
        App(handlers=[h]).start()


def test_startup_refuses_dangerous_and_duplicate_routes():
    h = Handler("d")

    @h.route("(u)@app.example", u=r"(a+)+")
    def START(ctx):
        return None

    with pytest.raises(StartupError, match="catastrophic"):
        App(handlers=[h]).start()
    h1, h2 = Handler("one"), Handler("two")
    for h in (h1, h2):
        h.route("same@app.example")(lambda ctx: None)
        h.states["START"] = h.states.pop("<lambda>")
        h.routes[0] = type(h.routes[0])("same@app.example", "START")
    with pytest.raises(StartupError, match="duplicate"):
        App(handlers=[h1, h2]).start()


def test_process_before_start_tempfails_instead_of_raising():
    d = App().process(request())
    assert d.is_tempfail and "start" in d.error


def test_app_route_sugar_binds_to_the_app_not_a_global():
    a1, a2 = App(name="one"), App(name="two")

    @a1.route("x@app.example")
    def START(ctx):
        ctx.deliver()

    a1.start(), a2.start()
    assert a1.match("x@app.example") is not None
    assert a2.match("x@app.example") is None


def test_a_retry_with_the_same_replay_key_replays_the_decision_without_running_handlers():
    app = counter_app()
    first = request(to=("counter@app.example", "echo@app.example"))
    first.replay_key = "ident:ABC123"
    d1 = app.process(first)
    again = request(to=("counter@app.example", "echo@app.example"))
    again.replay_key = "ident:ABC123"
    d2 = app.process(again)
    # the counter ran once: same state, same data
    assert state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 1}
    assert d2.outcomes == d1.outcomes and d2.header_changes == d1.header_changes
    assert d2.outbox == () and "retry: decision replayed" in d2.notes
    other = request()
    other.replay_key = "ident:OTHER"
    app.process(other)
    assert state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 2}


def test_a_tempfailed_attempt_is_not_recorded_so_the_retry_runs():
    app = counter_app()
    app.process(request())
    r1 = request(subject="boom")
    r1.replay_key = "ident:X"
    assert app.process(r1).is_tempfail
    r2 = request(subject="fine")
    r2.replay_key = "ident:X"
    d = app.process(r2)
    assert not d.is_tempfail and state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 2}


class CountingStorage(MemoryStorage):
    """MemoryStorage that counts the transactions opened on it."""

    def __init__(self):
        super().__init__()
        self.opened = 0

    def transaction(self, commit=True):
        self.opened += 1
        return super().transaction(commit=commit)


def test_a_route_that_touches_no_state_opens_no_transaction_and_keeps_no_replay_record():
    storage = CountingStorage()
    app = counter_app(storage=storage)
    r = request(to=("echo@app.example",))
    r.replay_key = "msgid:echo"
    d = app.process(r)
    assert d.header_changes and d.outcomes[0].action is Action.DELIVER
    assert storage.opened == 0
    with storage.transaction(commit=False) as tx:
        assert tx.find("lamsonfilter:done:") == []
    app.process(request())  # a stateful route does open one (and records its decision)
    assert storage.opened == 2


def test_a_stateless_reply_is_committed_once_even_when_the_retry_runs_the_handler_again():
    h = Handler("auto")

    @h.route("auto@(host)")
    @stateless
    def AUTO(ctx, host):
        ctx.add_header("X-Auto", "1")
        ctx.reply(body="got it", subject="Re: your mail")

    app = App(hosts=["app.example"], handlers=[h], storage=MemoryStorage()).start()
    first = request(to=("auto@app.example",))
    first.replay_key = "msgid:auto-1"
    d1 = app.process(first)
    again = request(to=("auto@app.example",))
    again.replay_key = "msgid:auto-1"
    d2 = app.process(again)
    assert len(d1.outbox) == 1 and d2.outbox == () and "retry: decision replayed" in d2.notes
    assert d2.header_changes == d1.header_changes
    with app.storage.transaction(commit=False) as tx:
        assert len(tx.find("lamsonfilter:done:")) == 1


def test_content_replay_key_reads_the_raw_first_message_id_field_only():
    folded = MailRequest.from_bytes(
        b"Subject: x\r\nMessage-ID:\r\n <fold@x.example>\r\n\r\nbody\r\n",
        sender="a@b.example", recipients=["c@d.example"])
    plain = MailRequest.from_bytes(
        b"Message-Id: <fold@x.example>\r\nSubject: x\r\n\r\nbody\r\n",
        sender="a@b.example", recipients=["c@d.example"])
    body_only = MailRequest.from_bytes(
        b"Subject: x\r\n\r\nMessage-ID: <body@x.example>\r\n", sender="a@b.example", recipients=["c@d.example"])
    assert folded.content_replay_key() == plain.content_replay_key() is not None
    assert body_only.content_replay_key() is None


def test_past_the_transports_deadline_nothing_is_committed(caplog):
    import time

    app = counter_app()
    app.process(request())  # n = 1
    late = request()
    late.deadline = time.monotonic() - 1  # the transport already answered 4xx
    with caplog.at_level(logging.WARNING, logger="lamsonfilter"):
        d = app.process(late)
    assert d.is_tempfail and d.outcomes[0].code == 451
    assert state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 1}
    assert any("deadline passed" in r.getMessage() and "queue_id=Q1" in r.getMessage() for r in caplog.records)
    in_time = request()
    in_time.deadline = time.monotonic() + 60
    assert not app.process(in_time).is_tempfail
    assert state_of(app, "counter:alice@example.com:counter@app.example").data == {"n": 2}


def test_content_replay_key_uses_message_id_sender_and_recipients():
    a = request()
    b = MailRequest.from_bytes(a.raw, sender="alice@example.com", recipients=["counter@app.example"])
    c = MailRequest.from_bytes(a.raw, sender="mallory@example.com", recipients=["counter@app.example"])
    assert a.content_replay_key() == b.content_replay_key() != c.content_replay_key()
    no_id = MailRequest.from_bytes(b"Subject: x\r\n\r\n", sender="a@b.example", recipients=["c@d.example"])
    assert no_id.content_replay_key() is None


def test_a_reused_message_id_with_another_body_is_another_message():
    one = request(body="first post")
    two = MailRequest.from_bytes(one.raw.replace(b"first post", b"second post"), sender="alice@example.com",
                                 recipients=["counter@app.example"])
    again = MailRequest.from_bytes(one.raw, sender="alice@example.com", recipients=["counter@app.example"])
    assert b"second post" in two.raw
    assert one.content_replay_key() == again.content_replay_key() != two.content_replay_key()


def test_reserved_handler_name():
    with pytest.raises(Exception, match="reserved"):
        Handler("lamsonfilter")


def test_purge_replays_forgets_old_records_only():
    app = counter_app()
    for key, t in (("old", 1000.0), ("new", 5000.0)):
        r = request()
        r.replay_key = key
        app.process(r, now=t)
    assert app.purge_replays(older_than=2000, now=6000.0) == 1
    with app.storage.transaction(commit=False) as tx:
        assert [k for k, _ in tx.find("lamsonfilter:done:")] == ["lamsonfilter:done:new"]


def test_mail_before_start_is_not_a_startup_error() -> None:
    """Processing mail with an App that was never started is a usage error at run time, not a start-up one."""
    from lamsonfilter.app import AppNotReady

    app = App(hosts=["app.example"], storage=MemoryStorage())
    with pytest.raises(AppNotReady) as info:
        app.match("x@app.example")
    assert not isinstance(info.value, StartupError)
