"""Hostile mail, case by case, through the example mailing-list application.

Each test names the requirement of ``docs/reliability.rst`` it covers in its
docstring (X: MIME parsing, S: security, A: automatic replies, L: loops,
F: verified findings).  The common oracle: `App.process` answers with a
clean decision (never an exception, never a tempfail for a message that
would fail the same way on every retry), and whatever lamsonfilter
generates is CRLF-only and carries exactly the headers lamsonfilter set.
"""

from __future__ import annotations

import json
from email.utils import getaddresses
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamsonfilter import Action
from lamsonfilter.app import App
from lamsonfilter.cli import main
from lamsonfilter.decisions import HeaderValueError, OutboxMessage
from lamsonfilter.fsm import Handler, stateless
from lamsonfilter.guards import GENERATED_HEADER
from lamsonfilter.mail import (
    MAX_ADDRESS_LENGTH,
    MAX_STRUCTURED_FIELD,
    AddressError,
    Envelope,
    MailRequest,
)
from lamsonfilter.testing import AppTester, Result, make_message, parse
from lamsonfilter.views import Views

APP = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
HOST = "lists.example.org"
HELP = f"help@{HOST}"
LIST = f"python@{HOST}"
NOW = 1_800_000_000.0

REPLY_FIELDS = {
    "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "auto-submitted", "x-auto-response-suppress", "in-reply-to",
    "references", GENERATED_HEADER.lower(),
}


@pytest.fixture
def t() -> AppTester:
    return AppTester.from_directory(APP, now=NOW)


# --------------------------------------------------------------------- helpers
def message(*headers: str | bytes, body: bytes = b"hello\r\n", eol: bytes = b"\r\n") -> bytes:
    lines = [h.encode("utf-8") if isinstance(h, str) else h for h in headers]
    return b"".join(line + eol for line in lines) + eol + body


def field_names(raw: bytes) -> list[str]:
    head = b"" if raw.startswith(b"\r\n") else raw.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].strip().lower().decode("ascii")
        for line in head.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]


def assert_clean(result: Result) -> None:
    """The common oracle: a final decision, and only well-formed generated mail."""
    d = result.decision
    assert d.error is None, d.error
    assert not d.is_tempfail, d
    for m in d.outbox:
        assert_generated_ok(m, result.request)


def assert_generated_ok(m: OutboxMessage, request: MailRequest) -> None:
    rest = m.raw.replace(b"\r\n", b"")
    assert b"\r" not in rest and b"\n" not in rest, "bare CR or LF in generated mail"
    assert all(len(line) <= 998 for line in m.raw.split(b"\r\n"))
    names = field_names(m.raw)
    assert GENERATED_HEADER.lower() in names
    if m.kind == "reply":
        assert m.sender == "" and m.recipients == (request.sender,)
        assert set(names) <= REPLY_FIELDS and len(names) == len(set(names)), names
        msg = parse(m.raw)
        assert [a for _n, a in getaddresses([str(v) for v in msg.get_all("To", [])])] == [request.sender]


def nested(depth: int, to: str = HELP) -> bytes:
    out = f"From: eve@example.net\r\nTo: {to}\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".encode()
    for i in range(depth):
        out += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
    out += b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for i in reversed(range(depth)):
        out += b"--b%d--\r\n" % i
    return out


CLEAN_MULTIPART = message(
    "From: eve@example.net", f"To: {HELP}", "Subject: parts", "MIME-Version: 1.0",
    'Content-Type: multipart/mixed; boundary="XYZ"',
    body=b"--XYZ\r\nContent-Type: text/plain\r\n\r\none\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--XYZ--\r\n",
)


# --------------------------------------------------------------------- X: MIME
AMBIGUOUS = {
    "duplicate boundary": (
        message(
            "From: eve@example.net", "Subject: two boundaries", "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="AAA"; boundary="BBB"',
            body=b"--AAA\r\nContent-Type: text/plain\r\n\r\nseen by CPython\r\n--AAA--\r\n"
                 b"--BBB\r\nContent-Type: text/plain\r\n\r\nseen by the other reader\r\n--BBB--\r\n",
        ),
        "DuplicateBoundary",
    ),
    "duplicate Content-Type": (
        message(
            "From: eve@example.net", "Subject: two types", "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="AAA"', "Content-Type: text/plain",
            body=b"--AAA\r\nContent-Type: text/plain\r\n\r\nx\r\n--AAA--\r\n",
        ),
        "DuplicateContentType",
    ),
    "duplicate Content-Transfer-Encoding": (
        message(
            "From: eve@example.net", "Subject: two encodings", "Content-Type: text/plain",
            "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: 7bit",
            body=b"aGVsbG8=\r\n",
        ),
        "DuplicateContentTransferEncoding",
    ),
    "multipart without boundary parameter": (
        message("From: eve@example.net", "Subject: none", "Content-Type: multipart/mixed", body=b"x\r\n"),
        "NoBoundaryInMultipartDefect",
    ),
    "boundary never used": (
        message(
            "From: eve@example.net", "Subject: missing", 'Content-Type: multipart/mixed; boundary="Q"',
            body=b"no boundary line at all\r\n",
        ),
        "StartBoundaryNotFoundDefect",
    ),
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_mime_is_flagged_and_still_handled(t: AppTester, case: str) -> None:
    """X2, F4, X1: ambiguous MIME is flagged (ambiguous_mime), handled cleanly, and passed on unmodified."""
    raw, defect = AMBIGUOUS[case]
    r = t.send("eve@example.net", [HELP, "friend@elsewhere.example"], raw=raw)
    assert r.request.ambiguous_mime, r.request.defects
    assert defect in r.request.defects
    assert_clean(r)
    assert r.outcome(HELP).action is Action.DROP
    assert r.outcome("friend@elsewhere.example").action is Action.DELIVER
    assert r.output is r.request.raw


def test_clean_multipart_is_not_ambiguous(t: AppTester) -> None:
    """X2: a well-formed multipart is not flagged (no false alarm)."""
    r = t.send("eve@example.net", HELP, raw=CLEAN_MULTIPART)
    assert not r.request.ambiguous_mime
    assert r.request.defects == ()
    assert_clean(r)
    assert len(r.replies) == 1


def test_deep_mime_nesting_is_handled_and_flagged(t: AppTester) -> None:
    """X3, X2, X1: 500 levels of multipart (Postfix refuses > 100) never raise, never tempfail; flagged ambiguous."""
    raw = nested(500)
    r = t.send("eve@example.net", [HELP, "friend@elsewhere.example"], raw=raw)
    assert_clean(r)
    assert r.request.ambiguous_mime
    assert "MimeNestingTooDeep" in r.request.defects
    assert r.output is raw


def test_nesting_at_postfix_limit_is_not_flagged() -> None:
    """X2: nesting up to mime_nesting_limit (100) is ordinary MIME."""
    req = MailRequest.from_bytes(nested(100), sender="eve@example.net", recipients=[HELP])
    assert not req.ambiguous_mime and "MimeNestingTooDeep" not in req.defects


def test_parser_recursion_limit_is_a_defect_not_an_exception() -> None:
    """X1, X3: nesting deep enough to exhaust the parser's recursion gives headers and a defect, not RecursionError."""
    req = MailRequest.from_bytes(nested(1100), sender="eve@example.net", recipients=[HELP])
    assert req.header("Subject") == "deep"
    assert req.ambiguous_mime
    assert "MimeNestingTooDeep" in req.defects


HUGE = 1024 * 1024


@pytest.mark.parametrize(
    "field",
    [
        b"X-Huge: " + b"a" * HUGE,
        b"Subject: " + b"word " * (HUGE // 5),
        b"Received: " + b"=?utf-8?q?a?= " * (HUGE // 14),
        b"Content-Type: text/plain;" + b";" * HUGE,
        b"To: " + b", ".join(b"member%d@example.net" % i for i in range(HUGE // 22)),
    ],
    ids=["x-header", "subject", "received", "content-type", "to"],
)
def test_one_megabyte_header_is_refused_quickly_not_parsed(t: AppTester, field: bytes) -> None:
    """X3 (gh-136063): a 1 MB header field is never handed to the quadratic header parser.

    Routed recipients are refused with 554 5.6.0 (discard and quarantine in
    the content filter), not deferred: the same message would fail on every
    retry.  Other recipients get the original bytes.
    """
    raw = b"From: eve@example.net\r\n" + field + b"\r\nMessage-ID: <m@example.net>\r\n\r\nbody\r\n"
    r = t.send("eve@example.net", [HELP, "friend@elsewhere.example"], raw=raw)
    assert_clean(r)
    assert r.request.oversized_header is not None
    refused = r.outcome(HELP)
    assert refused.action is Action.REJECT and (refused.code, refused.enhanced) == (554, "5.6.0")
    assert r.outbox == ()
    assert r.outcome("friend@elsewhere.example").action is Action.DELIVER
    assert r.output is raw


def test_semicolon_stuffed_content_type_within_postfix_limit_is_refused(t: AppTester) -> None:
    """X3 (cpython #87075, gh-136063): 100 KB of ';' (under Postfix's header_size_limit) takes minutes to parse; refused."""
    raw = b"From: eve@example.net\r\nContent-Type: text/plain;" + b";" * 100_000 + b"\r\n\r\nbody\r\n"
    r = t.send("eve@example.net", HELP, raw=raw)
    assert_clean(r)
    assert r.action is Action.REJECT and r.outbox == ()


def test_huge_header_fields_inside_mime_parts_are_not_parsed(t: AppTester) -> None:
    """X3: the parser reads every part's Content-Type itself; 30 parts with 20 KB of ';' each are handled at once."""
    part = b"--b\r\nContent-Type: text/plain;" + b";" * 20_000 + b"\r\n\r\npart\r\n"
    raw = message(
        "From: eve@example.net", "Subject: parts", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b"',
        body=part * 30 + b"--b--\r\n",
    )
    r = t.send("eve@example.net", HELP, raw=raw)
    assert r.request.oversized_header is None
    assert_clean(r)
    assert len(r.replies) == 1


def test_request_helpers_never_parse_an_oversized_field() -> None:
    """X3, X1: header(), defects and the content replay key (used before App.process) stay cheap on a 1 MB field."""
    raw = b"From: eve@example.net\r\nMessage-ID: <m1@example.net>\r\nContent-Type: text/plain;" + b";" * HUGE + b"\r\n\r\nbody\r\n"
    req = MailRequest.from_bytes(raw, recipients=[HELP])
    assert req.header("Message-ID") == "<m1@example.net>"
    assert req.header("Content-Type") == ""  # too large to read: empty
    assert req.content_replay_key() is not None
    assert "HeaderTooLarge" in req.defects and req.ambiguous_mime


@pytest.mark.parametrize("raw", [nested(1100), b"From: eve@example.net\r\nContent-Type: a/b;" + b";" * HUGE + b"\r\n\r\nx\r\n"],
                         ids=["deep-nesting", "huge-content-type"])
def test_dry_run_reports_hostile_mime_without_crashing(raw: bytes) -> None:
    """X1, X2, X3: `lamsonfilter test --json` reports deep nesting and a huge header as defects, exit 0, no traceback."""
    result = CliRunner().invoke(
        main, ["test", "--app", str(APP), "--database", "memory:", "--json", "--rcpt", HELP], input=raw
    )
    assert result.exit_code == 0, result.output
    [report] = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert report["error"] is None
    assert {"MimeNestingTooDeep", "HeaderTooLarge"} & set(report["defects"])


def test_large_but_sane_headers_are_processed_normally(t: AppTester) -> None:
    """X3: the header budget does not refuse ordinary large headers (a long To list, a long X- field)."""
    to = ", ".join(f"m{i}@example.net" for i in range((MAX_STRUCTURED_FIELD - 200) // 18))
    raw = message("From: eve@example.net", f"To: {to}", "X-Report: " + "x" * 20_000, "Subject: hi")
    r = t.send("eve@example.net", HELP, raw=raw)
    assert r.request.oversized_header is None
    assert_clean(r)
    assert len(r.replies) == 1


def test_bare_lf_message_is_answered_with_crlf_and_passed_on_unchanged(t: AppTester) -> None:
    """X1, R10, R11: an LF-only message is handled; the reply is CRLF-only; the passed-on bytes are the input."""
    raw = message("From: eve@example.net", f"To: {HELP}", "Subject: lf only", body=b"one\ntwo\n", eol=b"\n")
    r = t.send("eve@example.net", [HELP, "friend@elsewhere.example"], raw=raw)
    assert_clean(r)
    assert len(r.replies) == 1 and r.replies[0]["Subject"] == "Re: lf only"
    assert r.output is raw


def test_nul_bytes_in_headers_and_body(t: AppTester) -> None:
    """X1, S3: NUL bytes in the Subject and the body never raise; the reply copying the Subject is suppressed."""
    raw = message("From: eve@example.net", b"Subject: a\x00b", body=b"nul \x00 in body\r\n")
    r = t.send("eve@example.net", HELP, raw=raw)
    assert_clean(r)
    assert r.outbox == ()
    assert any("suppressed" in n for n in r.decision.notes)
    other = t.send("eve@example.net", f"python-subscribe@{HOST}", raw=raw)  # a reply with its own Subject
    assert_clean(other)
    assert len(other.replies) == 1 and b"\x00" not in other.outbox[0].raw


@pytest.mark.parametrize(
    "subject", [b"caf\xc3\xa9 \xe2\x82\xac", b"caf\xe9 latin-1", b"\xff\xfe\x80 bytes", b"=?utf-8?b?Y2Fmw6k=?= \xc3\xa9"]
)
def test_eight_bit_headers(t: AppTester, subject: bytes) -> None:
    """X1, X4: raw 8-bit header bytes (UTF-8 or not) never raise; the reply is 7-bit clean and well-formed."""
    raw = message(b"From: J\xc3\xb6rg <joerg@example.net>", b"Subject: " + subject, body=b"\xe9t\xe9\r\n")
    r = t.send("joerg@example.net", [HELP, "friend@elsewhere.example"], raw=raw)
    assert_clean(r)
    for m in r.outbox:
        assert m.raw.split(b"\r\n\r\n", 1)[0].isascii()
    assert r.output is raw


# --------------------------------------------------------------------- S: injection
HOSTILE_SUBJECTS = [
    "Re: =?UTF-8?Q?x=0D=0ABcc:_v@x.test?=",  # F1, CVE-2024-6923
    "=?UTF-8?B?eA0KQmNjOiB2QHgudGVzdA==?=",  # the same, B-encoded
    "=?utf-8?q?x=0ABcc:_v@x.test?=",  # LF only
    "=?utf-8?q?x=0DBcc:_v@x.test?=",  # CR only
    "=?utf-8?q?x=00y?=",  # NUL
    "=?utf-8?q?x=E2=80=A8Bcc:_v@x.test?=",  # U+2028 LINE SEPARATOR
    "=?utf-8?q?x=C2=85Bcc:_v@x.test?=",  # U+0085 NEXT LINE
    "=?utf-8?q?x=0D=0A=0D=0Ainjected_body?=",  # an empty line: the body starts early
]


@pytest.mark.parametrize("subject", HOSTILE_SUBJECTS)
def test_encoded_crlf_subject_copied_into_reply_is_suppressed_not_deferred(t: AppTester, subject: str) -> None:
    """S3, F1: a Subject that decodes to a line break is never copied into a reply; the message is not deferred.

    Sent three times with one queue id: always the same final decision (a
    poison message must not tempfail forever), never a Bcc in any output.
    """
    raw = message("From: eve@example.net", f"To: {HELP}", f"Subject: {subject}", "Message-ID: <e1@example.net>")
    for _attempt in range(3):
        r = t.send("eve@example.net", [HELP, LIST], raw=raw, queue_id="Q1")
        assert_clean(r)
        assert r.decision.kind == "drop"
        assert r.outbox == ()
        assert any("suppressed" in n for n in r.decision.notes), r.decision.notes


def test_subject_ending_in_an_encoded_line_feed_cannot_end_the_header_block(t: AppTester) -> None:
    """S3, F1: a value ending in LF (an extra blank line under the default policy) is answered safely or not at all."""
    raw = message("From: eve@example.net", "Subject: =?utf-8?q?end=0A?=", "Message-ID: <e2@example.net>")
    r = t.send("eve@example.net", HELP, raw=raw)
    assert_clean(r)
    for m in r.outbox:
        assert field_names(m.raw)[-1] == "mime-version"  # the whole header block is still headers
        assert parse(m.raw)["Subject"] == "Re: end"


def test_make_message_refuses_what_it_would_write_as_extra_headers() -> None:
    """S3, F1: the test helper never hands a test an injected Bcc line (CVE-2024-6923 on 3.11.7)."""
    with pytest.raises(HeaderValueError):
        make_message("eve@example.net", HELP, subject="=?UTF-8?Q?x=0D=0ABcc:_v@x.test?=")


def test_folded_subject_with_header_lookalike_gives_one_subject_line(t: AppTester) -> None:
    """S3: a folded Subject whose continuation looks like a header stays one Subject in the reply."""
    raw = message("From: eve@example.net", "Subject: hello", " Bcc: victim@example.net")
    r = t.send("eve@example.net", HELP, raw=raw)
    assert_clean(r)
    [reply] = r.outbox
    assert "bcc" not in field_names(reply.raw)


def test_header_injection_through_a_template_variable(t: AppTester) -> None:
    """S3, S4: a template variable holding CR/LF lands in the body only; in a header value it is refused."""
    views: Views = t.app.views
    hostile = "h\r\n\r\nBcc: victim@example.net\r\nX-Injected: 1"
    response = views.respond(
        "help.msg", {"host": hostile, "lists": [("a\r\nX-Injected: 2", "t")]},
        To="eve@example.net", From=HELP, Subject="Help",
    )
    raw = response.to_bytes()
    assert field_names(raw) == ["from", "to", "subject", "date", "message-id", "content-type",
                                "content-transfer-encoding", "mime-version"]
    assert "victim@example.net" in parse(raw).get_content()
    for value in (f"Re: {hostile}", "Re: =?UTF-8?Q?x=0D=0ABcc:_v@x.test?=", "x\x00y"):
        with pytest.raises(HeaderValueError):
            views.respond("help.msg", {"host": HOST, "lists": []}, To="eve@example.net", From=HELP, Subject=value)


def test_handler_copying_a_hostile_subject_into_a_reply_is_refused_not_deferred() -> None:
    """S3, F1: an application handler that builds "Re: " + subject from the message gets its reply refused, the message is not deferred."""
    h = Handler("echo")

    @h.route("echo@(host)")
    @stateless
    def ECHO(ctx, host):  # type: ignore[no-untyped-def]
        ctx.reply("help.msg", subject="Re: " + ctx.header("Subject"), host=host, lists=[])

    app = App(name="echo", hosts=[HOST], handlers=[h], views=Views(APP / "app" / "templates")).start()
    tester = AppTester(app, now=NOW)
    hostile = message("From: eve@example.net", "Subject: =?UTF-8?Q?x=0D=0ABcc:_v@x.test?=")
    bad = tester.send("eve@example.net", f"echo@{HOST}", raw=hostile)
    assert_clean(bad)
    assert bad.outbox == () and bad.decision.kind == "drop"
    good = tester.send("bob@example.net", f"echo@{HOST}", subject="hello")
    assert_clean(good)
    assert good.replies[0]["Subject"] == "Re: hello"


# --------------------------------------------------------------------- S6: addresses
def test_quoted_local_parts_route_on_the_domain_after_the_last_at(t: AppTester) -> None:
    """S6: "a@b"@host is a (refused) address at our host; "python@lists.example.org"@elsewhere is not ours."""
    r = t.send("eve@example.net", [f'"a@b"@{HOST}', f'"python"@{HOST}', f'"{LIST}"@elsewhere.example'])
    assert_clean(r)
    assert r.outcome(f'"a@b"@{HOST}').reply.startswith("550 5.1.1")
    assert r.outcome(f'"python"@{HOST}').action is Action.REJECT
    assert r.outcome(f'"{LIST}"@elsewhere.example').action is Action.DELIVER
    assert r.output is r.request.raw


def test_quoted_local_part_sender_gets_a_reply_to_exactly_that_address(t: AppTester) -> None:
    """S6, S2: a quoted local part with a space and an @ is one mailbox; the reply goes there only."""
    sender = '"john @ doe"@example.net'
    r = t.send(sender, HELP)
    assert_clean(r)
    [m] = r.outbox
    assert m.recipients == (sender,)


@pytest.mark.parametrize(
    "sender", ["eve@example.net, victim@example.net", "Eve <eve@example.net>", "a <victim@example.net>@example.net", '"@example.net']
)
def test_sender_that_is_not_one_mailbox_gets_no_reply(t: AppTester, sender: str) -> None:
    """S2, S3, S6: an envelope sender that reads as several (or other) addresses in a To header gets no reply."""
    r = t.send(sender, HELP)
    assert_clean(r)
    assert r.outbox == ()
    assert any("suppressed" in n for n in r.decision.notes)


@pytest.mark.parametrize(
    "address",
    [
        "p" * (MAX_ADDRESS_LENGTH + 1) + f"@{HOST}",
        f"{'a' * 300}@{'b' * 300}.example",
        f"python\x00@{HOST}",
        f"python\r\nRCPT TO:<victim@example.net>@{HOST}",
        f"python\x7f@{HOST}",
    ],
)
def test_overlong_or_control_character_paths_are_a_clean_error(t: AppTester, address: str) -> None:
    """S6: an over-long path or one with control characters is refused with AddressError before anything else."""
    with pytest.raises(AddressError):
        Envelope("eve@example.net", (address,))
    raw = message("From: eve@example.net", "Subject: hi")
    with pytest.raises(AddressError):
        t.send("eve@example.net", address, raw=raw)
    with pytest.raises(AddressError):
        t.send(address, HELP, raw=raw)


def test_overlong_path_on_the_command_line_is_a_clear_error() -> None:
    """S6: `lamsonfilter test` with a 400-character RCPT reports a bad envelope address, exit 1, no traceback."""
    raw = make_message("eve@example.net", HELP)
    result = CliRunner().invoke(
        main,
        ["test", "--app", str(APP), "--database", "memory:", "--sender", "eve@example.net", "--rcpt", "r" * 400 + f"@{HOST}"],
        input=raw,
    )
    assert result.exit_code == 1, result.output
    assert "bad envelope address" in result.output + (result.stderr or "")
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_utf8_local_parts_and_idn_domains(t: AppTester) -> None:
    """S6, R8: UTF-8 local parts and IDN domains give a clean outcome (refused, routed or passed on), never an exception."""
    rcpts = [f"jörg@{HOST}", f"python-jörg@{HOST}", "python@lists.exämple.org", "python@xn--lists-exmple-q5a.org", LIST.upper()]
    r = t.send("jörg@bücher.example", rcpts)
    assert_clean(r)
    assert r.outcome(f"jörg@{HOST}").reply.startswith("550 5.1.1")
    assert r.outcome(f"python-jörg@{HOST}").route == "mailinglist.help"
    assert r.outcome("python@lists.exämple.org").action is Action.DELIVER
    assert r.outcome("python@xn--lists-exmple-q5a.org").action is Action.DELIVER
    assert r.outcome(LIST.upper()).route == "mailinglist.post"
    assert r.outbox
    for m in r.outbox:
        assert m.recipients == ("jörg@bücher.example",)
        # RFC 6532 UTF-8 header, not RFC 2047 words inside the address (RFC 2047 §5 forbids them)
        to = [line for line in m.raw.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"to:")]
        assert to == ["To: jörg@bücher.example".encode()], to


def test_control_characters_that_survive_normalisation(t: AppTester) -> None:
    """S6, S3: C1 controls and U+2028 pass normalisation; they never reach a header (the reply is suppressed)."""
    raw = message("From: eve@example.net", "Subject: hi")
    for sender in ("eve\x85@example.net", "eve\u2028@example.net", "eve\u200b@example.net"):
        r = t.send(sender, [HELP, f"python\x85@{HOST}"], raw=raw)
        assert_clean(r)
        assert r.outcome(f"python\x85@{HOST}").action is Action.REJECT


# --------------------------------------------------------------------- A: automatic replies
@pytest.mark.parametrize(
    "sender, headers",
    [
        ("", {}),
        ("<>", {}),
        ("MAILER-DAEMON@mx.example.net", {}),
        ("postmaster@example.net", {}),
        ("owner-python@example.net", {}),
        ("python-request@example.net", {}),
        ("eve@example.net", {"Return-Path": "<>"}),
        ("eve@example.net", {"List-Id": "Some list <some.example.net>"}),
        ("eve@example.net", {"List-Unsubscribe": "<mailto:u@example.net>"}),
        ("eve@example.net", {"Precedence": "bulk"}),
        ("eve@example.net", {"Precedence": "List"}),
        ("eve@example.net", {"Precedence": "junk (filtered)"}),
        ("eve@example.net", {"Auto-Submitted": "auto-generated"}),
        ("eve@example.net", {"Auto-Submitted": "auto-replied"}),
        ("eve@example.net", {"Auto-Submitted": "AUTO-NOTIFIED (vacation)"}),
        ("eve@example.net", {"Auto-Submitted": "no-thanks"}),
        ("eve@example.net", {"X-Auto-Response-Suppress": "OOF, All"}),
        ("eve@example.net", {GENERATED_HEADER: "mailinglist"}),
        ("eve@example.net", {GENERATED_HEADER: "some-other-app"}),
    ],
)
def test_no_automatic_reply_to_robots_lists_or_generated_mail(t: AppTester, sender: str, headers: dict[str, str]) -> None:
    """A1, A2, L2: no reply to <>, daemons, list mail, bulk, Auto-Submitted, or lamsonfilter's own mail."""
    for rcpt in (HELP, LIST, f"python-subscribe@{HOST}"):
        r = t.send(sender, rcpt, headers=headers)
        assert_clean(r)
        assert r.outbox == (), (rcpt, r.decision.notes)


def test_auto_submitted_no_still_gets_a_reply(t: AppTester) -> None:
    """A2: `Auto-Submitted: No (comment)` is a person's mail; it is answered, with RFC 3834 headers."""
    r = t.send("eve@example.net", HELP, headers={"Auto-Submitted": "No (sent by hand)"})
    assert_clean(r)
    [reply] = r.replies
    assert reply["Auto-Submitted"] == "auto-replied"
    assert r.outbox[0].sender == ""


def test_forged_generated_header_does_not_skip_handling(t: AppTester) -> None:
    """L4: a forged X-Lamsonfilter-Generated header only silences the reply; the message is still handled."""
    r = t.send("eve@example.net", f"python-subscribe@{HOST}", headers={GENERATED_HEADER: "mailinglist"})
    assert_clean(r)
    # the handler ran (it saw no confirmation could go out, so it kept the sender in START)
    assert r.route == "mailinglist.subscribe" and (r.state_before, r.state_after) == ("START", "START")
    assert any("no confirmation sent" in n for n in r.decision.notes)
    assert r.outbox == ()


def test_list_posts_are_marked_as_generated_whatever_the_poster_wrote(t: AppTester) -> None:
    """L2: a post carries lamsonfilter's mark even when the poster's headers mention its name."""
    with t.app.storage.transaction() as tx:
        for who in ("alice@example.com", "bob@example.net"):
            tx.set(f"mailinglist:python:{who}", "MEMBER", {"joined": NOW, "bounces": 0})
    raw = message("From: alice@example.com", f"To: {LIST}", f"Subject: what is {GENERATED_HEADER}?")
    r = t.send("alice@example.com", LIST, raw=raw)
    assert_clean(r)
    posts = [m for m in r.outbox if m.kind == "message"]
    assert len(posts) == 2
    for m in posts:
        assert m.raw.startswith(f"{GENERATED_HEADER}: mailinglist\r\n".encode())


# --------------------------------------------------------------------- L: loops
def _echo_bot(reply: OutboxMessage, bot: str, keep_headers: bool, strip: tuple[str, ...] = ()) -> tuple[str, str, bytes]:
    """An external auto-responder at `bot` answering our reply: (envelope sender, recipient, raw)."""
    msg = parse(reply.raw)
    ours = msg["From"].addresses[0].addr_spec
    if keep_headers:  # it sends our message straight back (a forwarding loop)
        lines = [
            line for line in reply.raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            if not line.split(b":", 1)[0].strip().lower().decode() in strip
        ]
        raw = b"\r\n".join(lines) + b"\r\n\r\n" + reply.raw.split(b"\r\n\r\n", 1)[1]
    else:  # a naive vacation program: a fresh message, no RFC 3834 marks
        raw = make_message(bot, ours, subject="Re: " + str(msg["Subject"]), body="I am away.\n")
    return bot, ours, raw


@pytest.mark.parametrize(
    "keep_headers, strip",
    [
        (True, ()),  # our reply comes straight back: X-Lamsonfilter-Generated and Auto-Submitted stop it
        (True, (GENERATED_HEADER.lower(),)),  # the mark was stripped on the way: Auto-Submitted still stops it
        (True, ("auto-submitted",)),  # Auto-Submitted stripped: our mark still stops it
    ],
)
def test_two_responders_pointed_at_each_other_stop(t: AppTester, keep_headers: bool, strip: tuple[str, ...]) -> None:
    """L3, L2, A2, A3: our help responder and a mirroring responder exchange at most 2 messages (bounded at 50 rounds)."""
    bot = "bot@example.net"
    messages = 0
    result = t.send(bot, HELP)
    for _round in range(50):
        assert_clean(result)
        replies = [m for m in result.outbox if m.kind == "reply"]
        messages += len(replies)
        if not replies:
            break
        sender, rcpt, raw = _echo_bot(replies[0], bot, keep_headers, strip)
        t.advance(60)
        result = t.send(sender, rcpt, raw=raw)
    assert messages <= 2, messages
    assert not result.outbox


def test_naive_responder_loop_is_bounded_by_the_reply_limit(t: AppTester) -> None:
    """A3, A5, L3: a responder that marks nothing (no Auto-Submitted) still gets a bounded number of replies."""
    bot = "vacation@example.net"
    messages = 0
    result = t.send(bot, HELP)
    for _round in range(50):
        assert_clean(result)
        replies = [m for m in result.outbox if m.kind == "reply"]
        messages += len(replies)
        if not replies:
            break
        sender, rcpt, raw = _echo_bot(replies[0], bot, keep_headers=False)
        t.advance(1)
        result = t.send(sender, rcpt, raw=raw)
    assert messages <= 5, messages  # REPLY_LIMIT of the example: 5 per sender per hour
    assert not result.outbox


def test_two_lamsonfilter_deployments_answering_each_other_stop() -> None:
    """L2, L3, A1: two deployments whose responders answer each other: the first reply (MAIL FROM:<>) ends it."""
    a = AppTester.from_directory(APP, now=NOW)
    b = AppTester.from_directory(APP, now=NOW)
    sides = [(a, HELP), (b, f"python-info@{HOST}")]
    messages = 0
    result = b.send(f"python-info@{HOST}", HELP)  # a message from B's responder address to A
    turn = 0
    for _round in range(50):
        assert_clean(result)
        if not result.outbox:
            break
        messages += len(result.outbox)
        turn = 1 - turn
        tester, _addr = sides[turn]
        reply = result.outbox[0]
        # delivered to the other side with the envelope the reply has, and again
        # as if an MTA had rewritten the envelope sender to the From address
        for sender in (reply.sender, parse(reply.raw)["From"].addresses[0].addr_spec):
            result = tester.send(sender, reply.recipients[0], raw=reply.raw)
            assert_clean(result)
            assert result.outbox == ()
    assert messages <= 2, messages


def test_hop_limit_stops_handlers_before_postfix_would_bounce(t: AppTester) -> None:
    """L3: more Received: headers than MAX_HOPS (30, under Postfix's hopcount_limit of 50) means a loop: no handler, no reply."""
    assert t.app.max_hops < 50  # else Postfix bounces the loop before lamsonfilter ever sees it
    looping = message(*[f"Received: from hop{i}.example.net" for i in range(40)], "Subject: loop")
    r = t.send("eve@example.net", HELP, raw=looping)
    assert_clean(r)
    assert r.action is Action.REJECT and r.outcome().enhanced == "5.4.6"
    assert r.outbox == ()
    fine = message(*[f"Received: from hop{i}.example.net" for i in range(20)], "Subject: ok")
    assert len(t.send("eve@example.net", HELP, raw=fine).replies) == 1
