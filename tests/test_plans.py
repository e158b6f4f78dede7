"""The two transport tables: Decision → milter actions, Decision → reinjection + reply."""

from lamsonfilter.contentfilter.plan import reinjection_plan
from lamsonfilter.decisions import Action, Decision, HeaderChange, Outcome
from lamsonfilter.mail import MailRequest
from lamsonfilter.milterparts.plan import milter_plan

RAW = b"From: a@x.example\r\nTo: b@y.example\r\nSubject: s\r\n\r\nbody\r\n"


def req(*rcpts):
    return MailRequest.from_bytes(RAW, sender="a@x.example", recipients=rcpts or ("b@y.example",))


def test_deliver_unchanged():
    r = req()
    d = Decision.deliver_all(r.recipients)
    assert str(milter_plan(d, r)) == "ACCEPT"
    p = reinjection_plan(d, r)
    assert p.data is r.raw and p.recipients == ("b@y.example",) and p.reply.startswith("250")


def test_tempfail_everywhere_reinjects_nothing():
    r = req()
    d = Decision.tempfail(r.recipients, "boom")
    mp = milter_plan(d, r)
    assert mp.result == "TEMPFAIL" and mp.reply == ("451", "4.3.0", "Temporary failure, try again later")
    p = reinjection_plan(d, r, lmtp=True)
    assert not p.reinjects and p.reply.startswith("451 4.3.0")
    assert p.rcpt_replies == (("b@y.example", p.reply),)


def test_all_dropped_is_discard_and_nothing_reinjected():
    r = req()
    d = Decision((Outcome("b@y.example", Action.DROP),))
    assert milter_plan(d, r).result == "DISCARD"
    assert not reinjection_plan(d, r).reinjects


def test_some_dropped_some_redirected_and_header_changes():
    r = req("b@y.example", "c@y.example", "d@y.example")
    d = Decision(
        (
            Outcome("b@y.example", Action.DELIVER),
            Outcome("c@y.example", Action.DROP),
            Outcome("d@y.example", Action.REDIRECT, redirect_to=("e@z.example",)),
        ),
        header_changes=(HeaderChange("add", "X-A", "1"), HeaderChange("change", "Subject", "t")),
        sender="new@x.example",
    )
    mp = milter_plan(d, r)
    assert [str(a) for a in mp.actions] == [
        "chgfrom('<new@x.example>')",
        "delrcpt('<c@y.example>')",
        "delrcpt('<d@y.example>')",
        "addrcpt('<e@z.example>')",
        "addheader('X-A', '1')",
        "chgheader('Subject', 1, 't')",
    ]
    assert mp.result == "ACCEPT"
    p = reinjection_plan(d, r)
    assert p.sender == "new@x.example" and p.recipients == ("b@y.example", "e@z.example")
    assert b"X-A: 1\r\n" in p.data and b"Subject: t\r\n" in p.data and p.data.endswith(b"\r\n\r\nbody\r\n")


def test_reject_is_a_milter_reject_but_never_a_bounce_after_queueing():
    r = req()
    d = Decision((Outcome("b@y.example", Action.REJECT, 550, "5.7.1", "go away"),))
    mp = milter_plan(d, r)
    assert mp.result == "REJECT" and mp.reply == ("550", "5.7.1", "go away")
    smtp = reinjection_plan(d, r)
    assert smtp.reply.startswith("250") and smtp.quarantine and not smtp.reinjects
    lmtp = reinjection_plan(d, r, lmtp=True)
    assert lmtp.rcpt_replies == (("b@y.example", "550 5.7.1 go away"),)


def test_quarantine_accepts_into_hold():
    r = req()
    d = Decision((Outcome("b@y.example", Action.DELIVER),), quarantine="suspicious")
    mp = milter_plan(d, r)
    assert [a.method for a in mp.actions] == ["quarantine"] and mp.result == "ACCEPT"
    assert reinjection_plan(d, r).quarantine == "suspicious"


def test_body_replacement_keeps_headers_verbatim():
    r = req()
    d = Decision((Outcome("b@y.example", Action.DELIVER),), body=b"new\r\n")
    assert [a.method for a in milter_plan(d, r).actions] == ["replacebody"]
    assert reinjection_plan(d, r).data == b"From: a@x.example\r\nTo: b@y.example\r\nSubject: s\r\n\r\nnew\r\n"


def test_a_rejected_recipient_among_consumed_ones_is_still_refused_in_the_milter():
    r = req("list@y.example", "other@y.example")
    d = Decision((Outcome("list@y.example", Action.DROP),
                  Outcome("other@y.example", Action.REJECT, 550, "5.7.1", "You are not subscribed")))
    mp = milter_plan(d, r)
    assert mp.result == "REJECT" and mp.reply == ("550", "5.7.1", "You are not subscribed")
    assert any("other@y.example" in n for n in mp.notes)


def test_a_recipient_rejected_after_data_among_delivered_ones_is_removed_with_delrcpt():
    # After DATA a milter cannot refuse one recipient of several; without delrcpt
    # Postfix would deliver to the address the application refused.
    r = req("b@y.example", "closed@y.example", "c@y.example")
    d = Decision((Outcome("b@y.example", Action.DELIVER),
                  Outcome("closed@y.example", Action.REJECT, 550, "5.7.1", "This list is closed"),
                  Outcome("c@y.example", Action.DELIVER)))
    mp = milter_plan(d, r)
    assert mp.result == "ACCEPT" and mp.reply is None
    assert [str(a) for a in mp.actions] == ["delrcpt('<closed@y.example>')"]
    assert any("closed@y.example" in n and "delrcpt" in n for n in mp.notes)
    # the content filter: reinjected to the delivered ones only
    assert reinjection_plan(d, r).recipients == ("b@y.example", "c@y.example")


SLOW, TAG = "slow@app.example", "tag@app.example"


def test_milter_plan_removes_a_deferred_recipient_and_discards_when_all_are():
    request = req(SLOW, TAG)
    mixed = Decision((Outcome(SLOW, Action.DEFER), Outcome(TAG, Action.DELIVER)))
    plan = milter_plan(mixed, request)
    assert plan.result == "ACCEPT" and [str(a) for a in plan.actions] == [f"delrcpt('<{SLOW}>')"]
    assert any("deferred to the queue" in n for n in plan.notes)
    only = Decision((Outcome(SLOW, Action.DEFER),))
    assert milter_plan(only, req(SLOW)).result == "DISCARD"
    assert only.kind == "defer"


def test_content_filter_plan_does_not_reinject_to_a_deferred_recipient():
    request = req(SLOW, TAG)
    mixed = Decision((Outcome(SLOW, Action.DEFER), Outcome(TAG, Action.DELIVER)))
    plan = reinjection_plan(mixed, request)
    assert plan.recipients == (TAG,) and plan.reply.startswith("250")
    assert any(SLOW in n and "not reinjected" in n for n in plan.notes)
    only = reinjection_plan(Decision((Outcome(SLOW, Action.DEFER),)), req(SLOW))
    assert not only.reinjects and only.reply.startswith("250")
    lmtp = reinjection_plan(mixed, request, lmtp=True)
    assert [r for _a, r in lmtp.rcpt_replies] == [lmtp.reply, lmtp.reply]  # 250 for both
