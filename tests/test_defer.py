"""ctx.defer(): App and Context (the call's side effects dropped, other recipients kept),
AppTester, the dry run.  The runtime's queue write is in test_defer_runtime.py; the tables in
test_plans.py, the replay record in test_decisions.py."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lamsonfilter import Action, App, Handler, MailRequest, stateless
from lamsonfilter.cli import main
from lamsonfilter.diagnostics import Trace
from lamsonfilter.testing import AppTester, make_message

HOST = "app.example"
SLOW = f"slow@{HOST}"
TAG = f"tag@{HOST}"
ALICE = "alice@example.com"


def defer_app(storage=None) -> App:
    h = Handler("slow")

    @h.route("slow@(host)")
    def START(ctx, host):
        # everything this call asks for before deferring must be dropped
        ctx.data["seen"] = True
        ctx.add_header("X-Slow", "before defer")
        ctx.set_state("other-key", "DONE", {"by": "deferred call"})
        ctx.send(b"Subject: from a deferred call\r\n\r\nx\r\n", sender="slow@app.example",
                 recipients=("ops@app.example",))
        assert ctx.reply(body="we are on it")  # counts against the reply limit: taken back too
        if ctx.header("Subject") == "swallow":
            try:
                ctx.defer()
            except Exception:  # noqa: BLE001 -- a handler that catches it is still deferred
                pass
            return DONE
        if not ctx.from_queue:
            ctx.defer()
        ctx.data["ran"] = "from the queue"
        ctx.add_header("X-Slow", "ran from the queue")
        return DONE

    @h.state
    def DONE(ctx):
        if ctx.header("Subject") == "again":
            ctx.defer()
        return None

    @h.route("claimer@(host)")
    @stateless
    def CLAIMER(ctx, host):
        ctx.claim("token-1")
        ctx.defer()

    t = Handler("tag")

    @t.route("tag@(host)")
    @stateless
    def TAGGER(ctx, host):
        ctx.add_header("X-Tag", "kept")
        ctx.send(b"Subject: kept\r\n\r\nx\r\n", sender="tag@app.example", recipients=("ops@app.example",))
        ctx.deliver()

    return App(hosts=[HOST], handlers=[h, t], route_defaults={"host": r"app\.example"},
               **({"storage": storage} if storage is not None else {})).start()


def req(to, subject="test", *, from_queue=False, sender=ALICE):
    raw = make_message(sender, to, subject=subject)
    r = MailRequest.from_bytes(raw, sender=sender, recipients=list(to), queue_id="Q1")
    r.from_queue = from_queue
    return r


def state(app, key):
    with app.storage.transaction(commit=False) as tx:
        return tx.get(key)


SLOW_KEY = f"slow:{ALICE}:{SLOW}"


# ---------------------------------------------------------------- App and Context
def test_defer_drops_the_calls_side_effects_and_keeps_the_other_recipients(storage):
    app = defer_app(storage)
    trace = Trace()
    d = app.process(req([TAG, SLOW]), trace=trace)
    slow, tag = d.outcomes[1], d.outcomes[0]
    assert slow.action is Action.DEFER and tag.action is Action.DELIVER
    assert (slow.state_before, slow.state_after, slow.route) == ("START", "START", "slow.START")
    assert d.deferred == (SLOW,)
    # the tagger's header and outbox stay, the deferred call's are gone
    assert [(h.name, h.value) for h in d.header_changes] == [("X-Tag", "kept")]
    assert [m.raw.split(b"\r\n")[1] for m in d.outbox] == [b"Subject: kept"]
    # neither the conversation's state nor ctx.set_state's key was written
    assert state(app, SLOW_KEY) is None and state(app, "slow:other-key") is None
    assert [w.key for w in trace.writes] == []  # the dry run's list too
    assert storage.scan("") == []  # no reply-limit counter, no key at all
    assert any("deferred to the queue" in n for n in d.notes)
    assert not d.is_tempfail and d.kind == "modify"


def test_defer_undoes_set_state_of_a_key_that_existed(storage):
    app = defer_app(storage)
    with app.storage.transaction() as tx:
        tx.set("slow:other-key", "START", {"by": "before"})
    app.process(req([SLOW]))
    rec = state(app, "slow:other-key")
    assert rec is not None and (rec.state, rec.data) == ("START", {"by": "before"})


def test_the_run_from_the_queue_does_the_work(storage):
    app = defer_app(storage)
    assert app.process(req([SLOW])).outcomes[0].action is Action.DEFER
    later = app.process(req([SLOW], from_queue=True))
    o = later.outcomes[0]
    assert (o.action, o.state_before, o.state_after) == (Action.DROP, "START", "DONE")
    rec = state(app, SLOW_KEY)
    assert rec.state == "DONE" and rec.data == {"seen": True, "ran": "from the queue"}
    assert state(app, "slow:other-key").state == "DONE"
    assert len([m for m in later.outbox if m.kind == "reply"]) == 1  # the run that did the work replied
    assert f"lamsonfilter:rate:slow:{ALICE}" in [k for k, _r in app.storage.scan("")]  # counted this time


def test_defer_from_the_queue_is_a_handler_error_naming_the_mistake(storage, caplog):
    app = defer_app(storage)
    app.process(req([SLOW], from_queue=True))  # now in DONE
    trace = Trace()
    d = app.process(req([SLOW], "again", from_queue=True), trace=trace)
    assert d.is_tempfail
    assert "ctx.defer()" in str(trace.error) and "from the queue" in str(trace.error)
    assert type(trace.error).__name__ == "HandlerError"


def test_defer_after_claim_is_refused(storage):
    app = defer_app(storage)
    trace = Trace()
    d = app.process(req([f"claimer@{HOST}"]), trace=trace)
    assert d.is_tempfail and "after ctx.claim()" in str(trace.error)
    with app.storage.transaction(commit=False) as tx:  # nothing committed: the token is free
        assert tx.claim("claimer:token-1")


def test_a_handler_that_catches_the_exception_is_still_deferred():
    app = defer_app()
    d = app.process(req([SLOW], "swallow"))
    assert d.outcomes[0].action is Action.DEFER and not d.header_changes and not d.outbox
    assert state(app, SLOW_KEY) is None


def test_a_deferral_is_replayed_on_a_retry(storage):
    app = defer_app(storage)
    first = app.process(req([SLOW]), replay_key="ident:Q1:x")
    again = app.process(req([SLOW]), replay_key="ident:Q1:x")
    assert first.outcomes[0].action is again.outcomes[0].action is Action.DEFER
    assert "retry: decision replayed" in again.notes


# ---------------------------------------------------------------- AppTester
def test_apptester_keeps_the_deferred_message_and_runs_it_from_the_queue():
    t = AppTester(defer_app())
    r = t.send(ALICE, [TAG, SLOW], subject="report")
    assert r.outcome(SLOW).action is Action.DEFER and r.outcome(TAG).action is Action.DELIVER
    assert [(q.sender, q.recipient) for q in t.queued] == [(ALICE, SLOW)]
    assert t.state("slow", f"{ALICE}:{SLOW}") is None
    (later,) = t.run_deferred()
    assert later.request.from_queue and later.request.recipients == (SLOW,)
    assert later.action is Action.DROP and later.state_after == "DONE" and not t.queued
    assert t.state("slow", f"{ALICE}:{SLOW}") == "DONE"
    assert str(later.request.message["Subject"]) == "report"


def test_apptester_send_from_queue_and_a_dry_run_queue_nothing():
    t = AppTester(defer_app())
    assert t.send(ALICE, SLOW, commit=False).action is Action.DEFER and t.queued == []
    assert t.send(ALICE, SLOW, from_queue=True).state_after == "DONE" and t.queued == []


# ---------------------------------------------------------------- the dry run
SLOW_HANDLER = '''
from lamsonfilter import Handler

handler = Handler("slow")


@handler.route("slow@(host)")
def START(ctx, host):
    if not ctx.from_queue:
        ctx.defer()
    return START
'''


def test_dry_run_shows_a_deferral_and_writes_nothing_to_the_queue(tmp_path):
    app = tmp_path / "app"
    (app / "app" / "handlers").mkdir(parents=True)
    (app / "config").mkdir()
    (app / "app" / "handlers" / "slow.py").write_text(SLOW_HANDLER)
    (app / "config" / "settings.py").write_text(
        f'HOSTS = ["{HOST}"]\nHANDLERS = ["slow"]\nDATABASE_URL = "memory:"\nTEMPLATES = []\n')
    msg = tmp_path / "m.eml"
    msg.write_bytes(make_message(ALICE, SLOW))
    r = CliRunner().invoke(main, ["test", "--app", str(app), str(msg)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "outcome: defer (ctx.defer(): the daemons queue the message" in r.output
    assert "dry run: not queued" in r.output and "decision:  defer" in r.output
    assert "milter:    DISCARD" in r.output
    r = CliRunner().invoke(main, ["test", "--json", "--app", str(app), str(msg)], catch_exceptions=False)
    out = json.loads(r.output)
    assert out["deferred"] == [SLOW] and out["recipients"][0]["action"] == "defer"
    assert not (app / "var" / "queue").exists()


@pytest.mark.parametrize("value", ["", 5])
def test_queue_setting_is_validated(tmp_path, value):
    from lamsonfilter.settings import SettingsError, load_settings

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings.py").write_text(f'HANDLERS = []\nQUEUE = {value!r}\n')
    with pytest.raises(SettingsError, match="QUEUE"):
        load_settings(tmp_path)
