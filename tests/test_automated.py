"""Automated mail: each kind recognised, on reconstructed real robots and on single signs.

The robots of tests/corpus/robots/ (see its README: an Apple vacation reply,
an fml list server's notice, three Outlook.com JMRP complaint reports) carry
none of the marks the guards knew before; each test names the detector that
catches it and shows, by taking that detector out, that the guards would
answer the robot without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lamsonfilter import automated
from lamsonfilter.automated import (
    AUTO_REPLY,
    BOUNCE,
    BULK,
    FEEDBACK,
    LIST,
    ROBOT,
    classify,
    first_sign,
)
from lamsonfilter.bounce import detect_bounce
from lamsonfilter.feedback import detect_feedback_loop
from lamsonfilter.guards import autoreply_refusal
from lamsonfilter.mail import MailRequest

ROBOTS = Path(__file__).parent / "corpus" / "robots"
BOUNCES = Path(__file__).parent / "corpus" / "bounces"


def take_out(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Run without the named detectors (the others keep their order)."""
    kept = {k: v for k, v in automated.DETECTORS.items() if k not in names}
    assert len(kept) == len(automated.DETECTORS) - len(names)
    monkeypatch.setattr(automated, "DETECTORS", kept)


def robot(name: str, sender: str = "someone@example.net") -> MailRequest:
    """A robot of the corpus, with an ordinary envelope sender: the message itself must tell."""
    return MailRequest.from_bytes((ROBOTS / name).read_bytes(), sender=sender,
                                  recipients=["help@lists.example.org"])


def mail(*headers: tuple[str, str], body: str = "hello\r\n", sender: str = "alice@example.com") -> MailRequest:
    given = {n.lower() for n, _v in headers}
    defaults = [("From", "Alice <alice@example.com>"), ("To", "help@lists.example.org"), ("Subject", "hi"),
                ("Message-ID", "<q1@example.com>")]
    lines = [(n, v) for n, v in defaults if n.lower() not in given] + list(headers)
    raw = "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n" + body
    return MailRequest.from_bytes(raw.encode(), sender=sender)


# --------------------------------------------------------------------- the reconstructed robots
def test_apple_vacation_reply_without_auto_submitted() -> None:
    req = robot("apple-vacation-01.eml")
    assert "Auto-Submitted" not in req.message
    found = classify(req)
    assert found is not None and found.kind == AUTO_REPLY
    assert autoreply_refusal(req) == "auto-responder (X-Apple-Action: VACATION)"
    assert detect_bounce(req) is None  # an automatic reply, not a bounce


def test_apple_vacation_reply_is_caught_by_its_subject_too(monkeypatch: pytest.MonkeyPatch) -> None:
    take_out(monkeypatch, "auto-reply-headers")
    assert autoreply_refusal(robot("apple-vacation-01.eml")) == "auto-reply subject ('Auto reply: What the python list is for')"
    take_out(monkeypatch, "auto-reply-subject")
    assert autoreply_refusal(robot("apple-vacation-01.eml")) is None  # without both, it would be answered


def test_fml_loop_alert_is_a_list_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    req = robot("fml-loop-alert-01.eml", sender="2ndml-admin@ml.example.jp")
    found = classify(req)
    assert found is not None and (found.kind, found.reason) == (LIST, "list server (X-MLServer)")
    assert autoreply_refusal(req) == "list server (X-MLServer)"
    take_out(monkeypatch, "list-server")
    assert autoreply_refusal(req) is None


def test_an_fml_message_id_alone_marks_a_list_server() -> None:
    req = mail(("Message-ID", "<202612020021.FMLAAB12345.2ndml@ml.example.jp>"))
    assert autoreply_refusal(req) == "list server (an fml Message-ID)"


@pytest.mark.parametrize("name, complainer, original", [
    ("outlook-jmrp-01.eml", "neko@hotmail.example", "<20261203024040.4Yq4Bb2Wc0z9sWr@example.com>"),
    ("outlook-jmrp-02.eml", "tora@outlook.example", "<20261204105801.4Yq5Cc3Xd1z9sWs@example.net>"),
    ("outlook-jmrp-03.eml", "mike@live.example", "<20261205192630.4Yq6Dd4Ye2z9sWt@example.org>"),
])
def test_outlook_jmrp_complaints_are_feedback_reports(name: str, complainer: str, original: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    req = robot(name, sender="staff@hotmail.com")
    report = detect_bounce(req)  # ctx.bounce
    assert report is not None and report.kind == "fbl" and report.complaint and not report.permanent
    assert report.addresses == (complainer,)
    assert report.original_message_id == original
    found = classify(req)  # ctx.automated
    assert found is not None and found.kind == FEEDBACK and found.report == report
    assert autoreply_refusal(req) == "feedback report (fbl)"
    # without the report reader (and the "when in doubt" rule behind it) it would be answered
    take_out(monkeypatch, "report")
    assert autoreply_refusal(req) == "looks automated (report-like subject, attached message)"
    take_out(monkeypatch, "doubt")
    assert autoreply_refusal(req) is None


def test_a_jmrp_report_without_its_header_is_known_by_its_sender_and_attachment() -> None:
    raw = (ROBOTS / "outlook-jmrp-02.eml").read_bytes().replace(b"X-HmXmrOriginalRecipient", b"X-Other")
    report = detect_feedback_loop(MailRequest.from_bytes(raw, sender="x@example.net"))
    assert report is not None and report.addresses == ("python@lists.example.org",)  # the original's To


def test_a_person_forwarding_a_message_is_not_a_feedback_report() -> None:
    raw = (ROBOTS / "outlook-jmrp-02.eml").read_bytes()
    raw = raw.replace(b"X-HmXmrOriginalRecipient", b"X-Other").replace(b"staff@hotmail.com", b"bob@example.net")
    raw = raw.replace(b"complaint about message from 198.51.100.3", b"look at this")
    req = MailRequest.from_bytes(raw, sender="bob@example.net")
    assert detect_feedback_loop(req) is None and classify(req) is None and autoreply_refusal(req) is None


def test_arf_reports_are_feedback_and_dsns_are_bounces() -> None:
    arf = MailRequest.from_bytes((BOUNCES / "arf-01.eml").read_bytes(), sender="x@example.net")
    found = classify(arf)
    assert found is not None and found.kind == FEEDBACK and found.report is not None
    dsn = MailRequest.from_bytes((BOUNCES / "rfc3464-01.eml").read_bytes())
    found = classify(dsn)
    # the most specific kind wins: a bounce (with its report), not merely a robot sender
    assert found is not None and found.kind == BOUNCE and found.report is not None
    assert found.report.addresses == ("userunknown@bouncehammer.jp",)


# --------------------------------------------------------------------- single signs
@pytest.mark.parametrize("header, kind", [
    (("X-Apple-Action", "VACATION"), AUTO_REPLY),
    (("X-Autoreply", "yes"), AUTO_REPLY),
    (("X-Autorespond", "x"), AUTO_REPLY),
    (("X-AutoReply-From", "alice@example.com"), AUTO_REPLY),
    (("X-Mail-Autoreply", "alice@example.com"), AUTO_REPLY),
    (("X-Auto-Reply", "yes"), AUTO_REPLY),
    (("X-MS-Exchange-Inbox-Rules-Loop", "alice@example.com"), AUTO_REPLY),
    (("Precedence", "auto_reply"), AUTO_REPLY),
    (("Auto-Submitted", "auto-replied"), AUTO_REPLY),
    (("Auto-Submitted", "auto-generated"), ROBOT),
    (("X-Autogenerated", "Reply"), ROBOT),
    (("X-Loop", "list@example.org"), ROBOT),
    (("X-Mailing-List", "<linux-kernel@vger.kernel.org>"), LIST),
    (("X-ML-Name", "Announce"), LIST),
    (("X-ML-Server", "x"), LIST),
    (("X-BeenThere", "python-list@python.org"), LIST),
    (("X-List-Administrivia", "yes"), LIST),
    (("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"), LIST),
    (("Precedence", "list"), LIST),
    (("Precedence", "bulk"), BULK),
    (("Feedback-ID", "1:campaign:esp"), BULK),
    (("X-Report-Abuse", "Please report abuse to abuse@esp.example"), BULK),
    (("From", "Mail Delivery Subsystem <root@mx.example.net>"), ROBOT),
])
def test_each_sign_has_its_kind(header: tuple[str, str], kind: str) -> None:
    req = mail(header)
    found = classify(req)
    assert found is not None and found.kind == kind
    assert autoreply_refusal(req) == first_sign(req).reason  # type: ignore[union-attr]


@pytest.mark.parametrize("subject", [
    "Auto reply: hello", "Automatic reply: hello", "AutoReply: hello", "Auto-Reply: x", "AUTO: Bob is out of the office",
    "Out of Office: hello", "Out of the office", "Abwesenheitsnotiz: hello", "Réponse automatique : hello",
    "Respuesta automática: hi", "Automatisch antwoord: hi", "自動応答: こんにちは",
])
def test_auto_reply_subjects(subject: str) -> None:
    found = classify(mail(("Subject", subject)))
    assert found is not None and found.kind == AUTO_REPLY


@pytest.mark.parametrize("subject", ["Re: automatic replies are annoying", "Office hours", "vacation plans?",
                                     "Autumn meeting", "Auto insurance question"])
def test_people_writing_about_such_things_are_answered(subject: str) -> None:
    req = mail(("Subject", subject))
    assert classify(req) is None and autoreply_refusal(req) is None


def test_ordinary_mail_is_no_kind() -> None:
    assert classify(mail()) is None and first_sign(mail()) is None


def test_when_in_doubt_a_report_like_message_gets_no_reply() -> None:
    body = ("--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
            "From: x@example.org\r\nSubject: y\r\n\r\nz\r\n--b--\r\n")
    req = mail(("Subject", "Undeliverable message"), ("MIME-Version", "1.0"),
               ("Content-Type", 'multipart/mixed; boundary="b"'), body=body)
    assert detect_bounce(req) is None
    found = classify(req)
    assert found is not None and found.kind == ROBOT and found.reason.startswith("looks automated")


def test_a_detector_that_fails_counts_as_a_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(request: MailRequest, headers: dict[str, list[str]]) -> None:
        raise RuntimeError("bug")

    monkeypatch.setitem(automated.DETECTORS, "broken", broken)
    assert autoreply_refusal(mail()) == "looks automated (broken failed)"


def test_a_suppressed_reply_is_noted_in_the_decision() -> None:
    from lamsonfilter.testing import AppTester

    app_dir = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
    t = AppTester.from_directory(app_dir, now=1_800_000_000.0)
    raw = (ROBOTS / "apple-vacation-01.eml").read_bytes()
    r = t.send("kijitora@icloud.example", "help@lists.example.org", raw=raw)
    assert r.route == "mailinglist.help" and r.replies == []
    assert "reply to kijitora@icloud.example suppressed: auto-responder (X-Apple-Action: VACATION)" in r.decision.notes


@pytest.mark.parametrize("name, kind, has_report", [
    ("apple-vacation-01.eml", AUTO_REPLY, False),
    ("fml-loop-alert-01.eml", LIST, False),
    ("outlook-jmrp-01.eml", FEEDBACK, True),
])
def test_a_handler_reads_the_kind_from_ctx_automated(name: str, kind: str, has_report: bool) -> None:
    from lamsonfilter import App, Handler, stateless
    from lamsonfilter.memorystore import MemoryStorage

    seen: list[object] = []
    h = Handler("robots")

    @h.route("help@app.example")
    @stateless
    def HELP(ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx.automated)
        ctx.reply(body="hello")

    app = App(hosts=["app.example"], handlers=[h], storage=MemoryStorage()).start()
    decision = app.process(MailRequest.from_bytes((ROBOTS / name).read_bytes(), sender="someone@example.net",
                                                  recipients=["help@app.example"]))
    (found,) = seen
    assert isinstance(found, automated.Automated) and found.kind == kind
    assert (found.report is not None) == has_report
    assert decision.outbox == () and any("suppressed" in n for n in decision.notes)
