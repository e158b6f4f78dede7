"""The example mailing list, flow by flow, with lamsonfilter's testing helpers (no mail server)."""

from pathlib import Path

import pytest

from lamsonfilter import Action
from lamsonfilter.testing import AppTester

APP = Path(__file__).resolve().parents[1]
HOST = "lists.example.org"
LIST = f"python@{HOST}"


@pytest.fixture
def t():
    return AppTester.from_directory(APP, now=1_800_000_000.0)


def confirm_address(result):
    [reply] = result.replies
    return reply["From"].addresses[0].addr_spec


def subscribe(t, who):
    r = t.send(who, f"python-subscribe@{HOST}", subject="subscribe")
    t.send(who, confirm_address(r), subject="Re: confirm")
    assert t.state("mailinglist", f"python:{who}") == "MEMBER"


def unsubscribe(t, who):
    r = t.send(who, f"python-unsubscribe@{HOST}", subject="unsubscribe")
    assert r.state_after == "MEMBER"  # not yet: a confirmation first
    return t.send(who, confirm_address(r), subject="Re: confirm leaving")


def test_subscribe_sends_a_confirmation_request(t):
    r = t.send("alice@example.com", f"python-subscribe@{HOST}", subject="please")
    assert r.route == "mailinglist.subscribe"
    assert (r.state_before, r.state_after) == ("START", "PENDING")
    assert r.action is Action.DROP
    [reply] = r.replies
    assert reply["To"] == "alice@example.com"
    assert reply["Auto-Submitted"] == "auto-replied"
    assert r.outbox[0].sender == ""  # auto-replies go out with MAIL FROM:<>
    addr = confirm_address(r)
    token = addr.split("@")[0].removeprefix("python-confirm-")
    assert len(token) == 32 and int(token, 16) >= 0  # 128 bits of hex
    assert addr in reply.get_content()


def test_confirming_makes_a_member_and_welcomes(t):
    r = t.send("alice@example.com", f"python-subscribe@{HOST}")
    c = t.send("alice@example.com", confirm_address(r), subject="Re: Confirm your subscription")
    assert c.route == "mailinglist.confirm"
    assert (c.state_before, c.state_after) == ("PENDING", "MEMBER")
    [welcome] = c.replies
    assert "Welcome" in welcome.get_content()
    # a message of its own, from the list, not "Re: ..." from the used confirmation address
    assert welcome["Subject"] == f"Welcome to python@{HOST}"
    assert welcome["From"].addresses[0].addr_spec == LIST


def test_a_subscribe_whose_confirmation_is_not_sent_stays_in_start(t):
    """No PENDING (waiting for a token) when the token was never mailed: here the reply limit is spent."""
    for _ in range(5):  # REPLY_LIMIT of the example: 5 replies per sender per hour
        assert t.send("eager@example.com", f"help@{HOST}").replies
    r = t.send("eager@example.com", f"python-subscribe@{HOST}")
    assert r.replies == []
    assert (r.state_before, r.state_after) == ("START", "START")
    assert t.state("mailinglist", "python:eager@example.com") is None
    assert any("no confirmation sent" in n and "stays in START" in n for n in r.decision.notes)
    assert any("reply rate limit" in n for n in r.decision.notes)
    t.advance(3601)  # the next hour: it works
    assert t.send("eager@example.com", f"python-subscribe@{HOST}").state_after == "PENDING"


def test_a_robot_subscribe_gets_no_token_and_no_state(t):
    r = t.send("alice@example.com", f"python-subscribe@{HOST}", headers={"Auto-Submitted": "auto-generated"})
    assert r.replies == [] and r.state_after == "START"
    assert t.state("mailinglist", "python:alice@example.com") is None


def test_token_is_single_use_and_bound_to_the_sender(t):
    r = t.send("alice@example.com", f"python-subscribe@{HOST}")
    addr = confirm_address(r)
    # mallory cannot use alice's token for herself
    m = t.send("mallory@example.net", addr)
    assert m.state_after == "START"
    assert t.state("mailinglist", "python:mallory@example.net") is None
    t.send("alice@example.com", addr)
    # after unsubscribing, the old token does not work again
    assert unsubscribe(t, "alice@example.com").state_after == "START"
    t.send("alice@example.com", f"python-subscribe@{HOST}")
    t.advance(3601)  # past the example's reply limit of 5 an hour
    again = t.send("alice@example.com", addr)
    assert again.state_after == "PENDING"
    assert "unknown, already used, or" in again.replies[0].get_content()


def test_token_expires(t):
    r = t.send("alice@example.com", f"python-subscribe@{HOST}")
    t.advance(3 * 24 * 3600 + 1)
    late = t.send("alice@example.com", confirm_address(r))
    assert late.state_after == "PENDING"
    assert t.state("mailinglist", "python:alice@example.com") == "PENDING"


def test_subscribing_again_replaces_the_token(t):
    first = t.send("alice@example.com", f"python-subscribe@{HOST}")
    second = t.send("alice@example.com", f"python-subscribe@{HOST}")
    assert confirm_address(first) != confirm_address(second)
    assert t.send("alice@example.com", confirm_address(first)).state_after == "PENDING"
    assert t.send("alice@example.com", confirm_address(second)).state_after == "MEMBER"


def test_member_post_goes_to_every_member_through_the_outbox(t):
    for who in ("alice@example.com", "bob@example.net", "carol@example.org"):
        subscribe(t, who)
    r = t.send("bob@example.net", LIST, subject="Hello all", body="Hi everyone\n")
    assert r.route == "mailinglist.post" and r.action is Action.DROP
    assert r.replies == []
    posts = [m for m in r.outbox if m.kind == "message"]
    assert sorted(m.recipients[0] for m in posts) == ["alice@example.com", "bob@example.net", "carol@example.org"]
    for m in posts:
        member = m.recipients[0]
        assert m.sender == f"python-bounce-{member.replace('@', '=')}@{HOST}"  # VERP
        assert m.raw.endswith(r.request.raw)  # the original bytes, list headers in front
    msg = r.messages[0]
    assert msg["List-Id"] == f"Python discussion <python.{HOST}>"
    assert msg["Precedence"] == "list"
    assert msg["Subject"] == "Hello all"


def test_a_post_naming_a_member_in_its_headers_still_reaches_that_member(t):
    """The relay guard (reliability S2) drops recipients taken from From/Reply-To/Sender; confirmed
    members are not taken from there, so a post with ``Reply-To: carol`` still reaches carol."""
    for who in ("alice@example.com", "bob@example.net", "carol@example.org"):
        subscribe(t, who)
    r = t.send("bob@example.net", LIST, subject="Ask Carol", headers={"Reply-To": "carol@example.org",
                                                                     "Sender": "alice@example.com"})
    posts = [m for m in r.outbox if m.kind == "message"]
    assert sorted(m.recipients[0] for m in posts) == ["alice@example.com", "bob@example.net", "carol@example.org"]
    assert not any("blocked" in n for n in r.decision.notes)


def test_other_list_members_do_not_get_the_post(t):
    subscribe(t, "alice@example.com")
    r = t.send("dora@example.org", f"announce-subscribe@{HOST}")
    t.send("dora@example.org", confirm_address(r))
    post = t.send("alice@example.com", LIST)
    assert [m.recipients for m in post.outbox] == [("alice@example.com",)]


def test_non_member_post_gets_a_polite_refusal_and_is_not_distributed(t):
    subscribe(t, "alice@example.com")
    r = t.send("stranger@example.net", LIST, subject="buy now")
    assert r.action is Action.DROP
    assert [m.kind for m in r.outbox] == ["reply"]
    assert "only members of the list may post" in " ".join(r.replies[0].get_content().split())


def test_unsubscribe_asks_the_member_to_confirm_then_leaves_the_list(t):
    subscribe(t, "alice@example.com")
    r = t.send("alice@example.com", f"python-unsubscribe@{HOST}")
    assert (r.state_before, r.state_after) == ("MEMBER", "MEMBER")
    [ask] = r.replies
    assert ask["To"] == "alice@example.com" and ask["Subject"] == f"Confirm leaving python@{HOST}"
    leave = confirm_address(r)
    assert leave.startswith("python-leave-") and leave in ask.get_content()
    # still a member until confirmed: gets posts
    assert [m.recipients for m in t.send("alice@example.com", LIST).outbox] == [("alice@example.com",)]
    c = t.send("alice@example.com", leave, subject="Re: Confirm leaving")
    assert c.route == "mailinglist.leave"
    assert (c.state_before, c.state_after) == ("MEMBER", "START")
    assert t.state("mailinglist", "python:alice@example.com") is None
    [bye] = c.replies
    assert "no longer subscribed" in bye.get_content()
    assert bye["Subject"] == f"You left python@{HOST}" and bye["From"].addresses[0].addr_spec == LIST
    # the token works once
    t.advance(3601)
    subscribe(t, "alice@example.com")
    assert t.send("alice@example.com", leave).state_after == "MEMBER"
    subscribe(t, "bob@example.net")
    post = t.send("bob@example.net", LIST)
    assert sorted(m.recipients for m in post.outbox) == [("alice@example.com",), ("bob@example.net",)]


def test_a_forged_unsubscribe_unsubscribes_nobody(t):
    """Anyone can forge alice's envelope sender; only alice receives the token that makes her leave."""
    subscribe(t, "alice@example.com")
    forged = t.send("alice@example.com", f"python-unsubscribe@{HOST}")  # from mallory, really
    assert forged.state_after == "MEMBER"
    assert [m.recipients for m in forged.outbox] == [("alice@example.com",)]  # the token goes to alice
    # mallory guesses: a wrong token, another member's token, an expired token
    guess = f"python-leave-{'0' * 32}@{HOST}"
    assert t.send("alice@example.com", guess).state_after == "MEMBER"
    subscribe(t, "bob@example.net")
    bobs = confirm_address(t.send("bob@example.net", f"python-unsubscribe@{HOST}"))
    assert t.send("alice@example.com", bobs).state_after == "MEMBER"
    t.advance(3 * 24 * 3600 + 1)
    assert t.send("alice@example.com", confirm_address(forged)).state_after == "MEMBER"
    assert t.state("mailinglist", "python:alice@example.com") == "MEMBER"
    assert t.state("mailinglist", "python:bob@example.net") == "MEMBER"


def test_unsubscribe_when_not_subscribed_says_so(t):
    r = t.send("alice@example.com", f"python-unsubscribe@{HOST}")
    assert r.state_after == "START"
    assert "not subscribed" in r.replies[0].get_content()


def bounce_for(member, status="5.1.1", action="failed"):
    verp = f"python-bounce-{member.replace('@', '=')}@{HOST}"
    raw = (
        "Return-Path: <>\r\nFrom: MAILER-DAEMON@mx.example.com\r\n"
        f"To: {verp}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nAuto-Submitted: auto-replied\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {member}\r\nAction: {action}\r\nStatus: {status}\r\n\r\n"
        "--b--\r\n"
    ).encode()
    return verp, raw


def test_bounces_count_against_a_member_and_disable_after_the_limit(t):
    subscribe(t, "alice@example.com")
    subscribe(t, "bob@example.net")
    verp, raw = bounce_for("alice@example.com")
    for n in (1, 2):
        r = t.send("", verp, raw=raw)
        assert r.route == "mailinglist.BOUNCE" and r.outbox == ()  # never answer a bounce
        assert t.data("mailinglist", "python:alice@example.com")["bounces"] == n
        assert t.state("mailinglist", "python:alice@example.com") == "MEMBER"
    t.send("", verp, raw=raw)
    assert t.state("mailinglist", "python:alice@example.com") == "DISABLED"
    post = t.send("bob@example.net", LIST)
    assert [m.recipients for m in post.outbox] == [("bob@example.net",)]
    # a disabled member who posts is told why; subscribing again starts over
    r = t.send("alice@example.com", LIST)
    assert "bounced too often" in r.replies[0].get_content()
    r = t.send("alice@example.com", f"python-subscribe@{HOST}")
    assert (r.state_before, r.state_after) == ("DISABLED", "PENDING")


def test_temporary_bounces_and_forged_bounces_do_not_count(t):
    subscribe(t, "alice@example.com")
    verp, raw = bounce_for("alice@example.com", status="4.2.2", action="delayed")
    t.send("", verp, raw=raw)
    # a plain message to the VERP address is not a delivery report
    t.send("mallory@example.net", verp, subject="haha")
    # a report about somebody else
    _, other = bounce_for("zed@example.com")
    t.send("", verp, raw=other)
    assert t.data("mailinglist", "python:alice@example.com")["bounces"] == 0


def complaint_for(member):
    """An Outlook.com JMRP complaint (no ARF) about a list post to `member`, sent to its VERP address."""
    verp = f"python-bounce-{member.replace('@', '=')}@{HOST}"
    robot = Path(__file__).resolve().parents[3] / "tests" / "corpus" / "robots" / "outlook-jmrp-02.eml"
    raw = robot.read_bytes().replace(b"tora@outlook.example", member.encode())
    return verp, raw


def test_complaints_count_like_bounces(t):
    subscribe(t, "alice@example.com")
    verp, raw = complaint_for("alice@example.com")
    r = t.send("staff@hotmail.com", verp, raw=raw)
    assert r.route == "mailinglist.BOUNCE" and r.outbox == ()  # never answer a complaint
    assert t.data("mailinglist", "python:alice@example.com")["bounces"] == 1
    # a complaint about somebody else does not count
    _, other = complaint_for("zed@example.com")
    t.send("staff@hotmail.com", verp, raw=other)
    assert t.data("mailinglist", "python:alice@example.com")["bounces"] == 1
    t.send("staff@hotmail.com", verp, raw=raw)
    t.send("staff@hotmail.com", verp, raw=raw)
    assert t.state("mailinglist", "python:alice@example.com") == "DISABLED"


def test_anything_else_at_the_host_gets_help(t):
    for addr in (f"python-info@{HOST}", f"help@{HOST}", f"announce-whatever@{HOST}"):
        r = t.send("dan@example.org", addr)
        assert r.route == "mailinglist.help"
        assert "The lists here" in r.replies[0].get_content()


def test_unknown_list_is_refused_and_other_domains_pass(t):
    r = t.send("dan@example.org", f"nosuchlist@{HOST}")
    assert r.action is Action.REJECT and r.outcome().reply.startswith("550 5.1.1")
    assert t.app.check_recipient(f"nosuchlist@{HOST}").code == 550
    other = t.send("dan@example.org", "friend@elsewhere.example")
    assert other.action is Action.DELIVER and other.output is other.request.raw


def test_no_reply_to_lists_bulk_or_robots(t):
    for headers in ({"Precedence": "bulk"}, {"List-Id": "<x.example.net>"}, {"Auto-Submitted": "auto-generated"}):
        r = t.send("robot@example.net", f"python-subscribe@{HOST}", headers=headers)
        assert r.replies == [] and any("suppressed" in n for n in r.decision.notes)
    r = t.send("", f"python-info@{HOST}")
    assert r.outbox == ()


def test_replies_are_rate_limited_per_sender(t):
    results = [t.send("chatty@example.net", f"help@{HOST}") for _ in range(7)]
    assert [len(r.replies) for r in results] == [1, 1, 1, 1, 1, 0, 0]
    t.advance(3601)
    assert len(t.send("chatty@example.net", f"help@{HOST}").replies) == 1


def test_hostile_subject_never_injects_a_header_into_a_reply(t):
    hostile = "=?UTF-8?Q?x=0D=0ABcc:_victim@example.net?="
    raw = (
        f"From: eve@example.net\r\nTo: python@{HOST}\r\nSubject: {hostile}\r\n"
        "Message-ID: <e1@example.net>\r\n\r\nhi\r\n"
    ).encode()
    r = t.send("eve@example.net", LIST, raw=raw)
    assert not r.decision.is_tempfail
    for m in r.outbox:
        head = m.raw.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nBcc:" not in head and b"\nBcc:" not in head
