"""The counting harness itself (tests/rig/accounting.py), against fakes: it can fail.

No Postfix here: captured messages, queue contents and client replies are
built by hand, so each test knows the right answer and checks that the
harness finds a loss, a duplicate, a bounce or a maillog anomaly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.rig.accounting import (
    Accounting,
    Injected,
    LostMail,
    bounced_seqs,
    delivered_seqs,
    maillog_anomalies,
    seqs_in_header,
)
from tests.rig.postfix import CapturedMessage
from tests.rig.submission import Reply, SendResult


def msg(seq: str | None, rcpt: str = "sink@example.net", sender: str = "inject@client.example.test") -> CapturedMessage:
    head = f"From: {sender}\r\nSubject: s\r\n" + (f"X-Test-Seq: {seq}\r\n" if seq else "")
    return CapturedMessage(sender, (rcpt,), (head + "\r\nbody X-Test-Seq: not-this-one\r\n").encode())


def dsn(seq: str, action: str = "failed") -> CapturedMessage:
    data = (
        "From: MAILER-DAEMON@rig.localdomain\r\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
        "--B\r\nContent-Type: text/plain\r\n\r\nundeliverable\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; rig\r\n\r\nFinal-Recipient: rfc822; sink@example.net\r\nAction: {action}\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: inject@client.example.test\r\nX-Test-Seq: {seq}\r\n--B--\r\n"
    ).encode()
    return CapturedMessage("", ("inject@client.example.test",), data)


def injected(seq: str, *replies: tuple[str, int, str], error: str | None = None) -> Injected:
    result = SendResult([Reply(c, code, text) for c, code, text in replies], error)
    return Injected(seq, f"<{seq}@x>", "inject@client.example.test", ("sink@example.net",), b"", (result,))


def test_all_delivered_is_nothing_lost() -> None:
    acc = Accounting(injected=["r-0", "r-1"], delivered_copies=delivered_seqs([msg("r-0"), msg("r-1")]))
    acc.assert_nothing_lost()
    assert acc.lost == [] and acc.duplicates == {}
    assert acc.summary() == "injected 2 delivered 2 bounced 0 queued 0 discarded 0 rejected 0 lost 0 duplicated 0"


def test_a_missing_seq_is_lost_and_raises() -> None:
    acc = Accounting(injected=["r-0", "r-1", "r-2"], delivered_copies=delivered_seqs([msg("r-0"), msg("r-2")]))
    assert acc.lost == ["r-1"]
    assert acc.counts()["lost"] == 1
    with pytest.raises(LostMail, match="lost 1"):
        acc.assert_nothing_lost()


def test_a_duplicate_is_counted_and_allowed_only_when_asked() -> None:
    acc = Accounting(injected=["r-0", "r-1"], delivered_copies=delivered_seqs([msg("r-0"), msg("r-0"), msg("r-1")]))
    assert acc.duplicates == {"r-0": 2}
    assert "duplicated 1" in acc.summary()
    with pytest.raises(LostMail, match="duplicated"):
        acc.assert_nothing_lost()
    acc.assert_nothing_lost(allow_duplicates=1)


def test_copies_to_different_recipients_are_no_duplicate() -> None:
    copies = delivered_seqs([msg("r-0", "a@example.net"), msg("r-0", "b@example.net")])
    assert Accounting(injected=["r-0"], delivered_copies=copies).duplicates == {}


def test_only_the_top_header_counts_as_delivered() -> None:
    assert seqs_in_header(msg("r-5").data) == ["r-5"]
    assert delivered_seqs([msg(None)]) == {}  # "X-Test-Seq" in the body is not a delivery


def test_bounces_are_read_from_failed_dsns_only() -> None:
    assert bounced_seqs([dsn("r-3")]) == {"r-3"}
    assert bounced_seqs([dsn("r-3", action="delayed")]) == set()
    assert delivered_seqs([dsn("r-3")]) == {}  # a DSN is not a delivery of the seq
    acc = Accounting(injected=["r-3"], bounced=bounced_seqs([dsn("r-3")]))
    acc.assert_nothing_lost()
    assert acc.counts()["bounced"] == 1


def test_queued_discarded_rejected_are_accounted() -> None:
    acc = Accounting(injected=["q", "d", "r"], queued={"q"}, discarded={"d"}, rejected={"r"})
    acc.assert_nothing_lost()
    with pytest.raises(LostMail, match="still queued"):
        acc.assert_nothing_lost(allow_queued=False)


def test_tempfailed_counts_only_when_the_client_keeps_it() -> None:
    acc = Accounting(injected=["t"], tempfailed={"t"})
    assert acc.lost == ["t"]
    acc.client_keeps_tempfailed = True
    acc.assert_nothing_lost()
    assert "kept by the client: 1" in acc.summary()


def test_injected_classifies_client_replies() -> None:
    ok = injected("a", ("MAIL", 250, "ok"), ("RCPT <sink@example.net>", 250, "ok"),
                  (".", 250, "2.0.0 Ok: queued as 4AbC123"))
    assert ok.accepted and ok.queue_id == "4AbC123" and not ok.tempfailed and not ok.rejected
    temp = injected("b", ("MAIL", 250, "ok"), ("RCPT <sink@example.net>", 250, "ok"), (".", 451, "4.3.0 later"))
    assert temp.tempfailed and not temp.rejected and temp.queue_id is None
    perm = injected("c", ("MAIL", 250, "ok"), ("RCPT <sink@example.net>", 550, "5.1.1 unknown"))
    assert perm.rejected and not perm.tempfailed
    broken = injected("d", ("MAIL", 250, "ok"), error="SMTPServerDisconnected: gone")
    assert broken.tempfailed


def test_maillog_cross_check() -> None:
    log = (
        "Nov 22 postfix/smtp[1]: 4AAAAAA: to=<sink@example.net>, relay=x, status=deferred (451)\n"
        "Nov 22 postfix/smtp[1]: 4AAAAAA: to=<sink@example.net>, relay=x, status=sent (250)\n"
        "Nov 22 postfix/smtp[1]: 4BBBBBB: to=<sink@example.net>, relay=x, status=sent (250)\n"
        "Nov 22 postfix/smtp[1]: 4BBBBBB: to=<sink@example.net>, relay=x, status=sent (250)\n"
        "Nov 22 postfix/smtp[1]: 4CCCCCC: to=<sink@example.net>, relay=x, status=deferred (451)\n"
    )
    ids = {"4AAAAAA": "a", "4BBBBBB": "b", "4CCCCCC": "c", "4DDDDDD": "d"}
    problems = maillog_anomalies(log, ids, still_queued={"4CCCCCC"}, excused={"d"})
    assert len(problems) == 1 and "4BBBBBB" in problems[0] and "2 final" in problems[0]
    problems = maillog_anomalies(log, ids, still_queued=set(), excused=set())
    assert any("4CCCCCC" in p for p in problems) and any("4DDDDDD" in p for p in problems)


def test_maillog_cross_check_counts_per_life_of_a_reused_queue_id() -> None:
    """Postfix reuses a short queue id once its queue file is removed: a final status in each life
    is fine; two in one life are not."""
    reused = (
        "Nov 22 postfix/smtp[1]: 4EEEEEE: to=<tag@x.example>, relay=filter, status=sent (250)\n"
        "Nov 22 postfix/qmgr[2]: 4EEEEEE: removed\n"
        "Nov 22 postfix/cleanup[3]: 4EEEEEE: message-id=<other@x.example>\n"
        "Nov 22 postfix/smtp[1]: 4EEEEEE: to=<tag@x.example>, relay=sink, status=sent (250)\n"
        "Nov 22 postfix/qmgr[2]: 4EEEEEE: removed\n"
    )
    assert maillog_anomalies(reused, {"4EEEEEE": "e"}, still_queued=set(), excused=set()) == []
    twice = reused.replace("Nov 22 postfix/qmgr[2]: 4EEEEEE: removed\nNov 22 postfix/cleanup", "Nov 22 postfix/cleanup")
    [problem] = maillog_anomalies(twice, {"4EEEEEE": "e"}, still_queued=set(), excused=set())
    assert "4EEEEEE (e) to=<tag@x.example>: 2 final status lines" in problem


def test_figures_are_appended_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "figures.jsonl"
    monkeypatch.setenv("LF_RELIABILITY_FIGURES", str(path))
    acc = Accounting(injected=["r-0"], delivered_copies=delivered_seqs([msg("r-0")]), mode="smtpproxy")
    acc.record("unit", rss_kib=1)
    acc.record("unit 2")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["scenario"] for r in rows] == ["unit", "unit 2"]
    assert rows[0]["mode"] == "smtpproxy" and rows[0]["delivered"] == 1 and rows[0]["lost"] == 0
    assert rows[0]["rss_kib"] == 1
