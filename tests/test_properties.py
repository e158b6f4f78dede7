"""Property tests over parse -> route -> handler -> render -> serialise (reliability O3).

Every property runs through the example mailing-list application
(``examples/mailinglist``, state in memory) or through the core pieces it is
built from, with hostile input drawn by Hypothesis:

* **A** -- ``App.process`` never raises and never answers with an error or a
  tempfail; every outbox message has CRLF line ends only, carries the
  generated-mail mark, and holds only the header fields lamsonfilter set
  (replies) or lamsonfilter's list headers in front of the poster's own
  bytes (list posts): nothing the input "asked for" by injection
  (reliability S3, X1, L2, F1).
* **B** -- a message no handler changes comes out byte for byte (R10).
* **C** -- ``Decision.apply`` keeps every untouched header line and the body
  exactly (R10, X4).
* **D** -- routing hostile addresses never raises and never backtracks
  catastrophically (S6, S7, F3).

The settings are fixed (``derandomize=True``, no example database) so that
CI runs the same examples every time; nothing asserts on wall-clock time.

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

from __future__ import annotations

import base64
import re
from email.header import decode_header, make_header
from email.utils import getaddresses
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lamsonfilter.decisions import Action, Decision, HeaderChange, Outcome
from lamsonfilter.guards import GENERATED_HEADER
from lamsonfilter.mail import MAX_ADDRESS_LENGTH, AddressError, Envelope, MailRequest
from lamsonfilter.routing import Router
from lamsonfilter.testing import AppTester, parse

APP_DIR = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
HOST = "lists.example.org"
NOW = 1_800_000_000.0

PROPERTY_SETTINGS = settings(
    deadline=None,
    max_examples=200,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Header fields a reply of the example application may carry, each at most once.
REPLY_FIELDS = frozenset(
    {
        "from", "to", "subject", "date", "message-id", "mime-version",
        "content-type", "content-transfer-encoding",
        "auto-submitted", "x-auto-response-suppress", "in-reply-to", "references",
        GENERATED_HEADER.lower(),
    }
)
#: Header fields the example application puts in front of a list post.
POST_PREFIX_FIELDS = frozenset(
    {GENERATED_HEADER.lower(), "list-id", "list-post", "list-unsubscribe", "precedence"}
)


# --------------------------------------------------------------------- helpers
def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def header_block(raw: bytes) -> bytes:
    """The header block of CRLF-only bytes, without the blank line."""
    if raw.startswith(b"\r\n"):
        return b""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[:end]


def field_names(head: bytes) -> list[str]:
    """Field names of a CRLF header block, one per line that does not continue a field."""
    names = []
    for line in head.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        name, colon, _rest = line.partition(b":")
        assert colon, f"header line without a colon: {line[:80]!r}"
        names.append(name.strip().lower().decode("ascii", "replace"))
    return names


def assert_crlf_only(raw: bytes) -> None:
    rest = raw.replace(b"\r\n", b"")
    assert b"\r" not in rest and b"\n" not in rest, "bare CR or LF outside CRLF"


def new_tester(members: tuple[str, ...] = ()) -> AppTester:
    t = AppTester.from_directory(APP_DIR, now=NOW)
    if members:
        with t.app.storage.transaction() as tx:
            for m in members:
                tx.set(f"mailinglist:python:{m.lower()}", "MEMBER", {"joined": NOW, "bounces": 0})
    return t


# --------------------------------------------------------------------- envelopes
LIST_LOCALS = [
    "python", "announce", "PYTHON", "python-subscribe", "announce-subscribe",
    "python-unsubscribe", "help", "python-info", "announce-whatever", "python-confirm-" + "a" * 32,
    "python-confirm-" + "0123456789abcdef" * 2, "python-confirm-zz", "python-bounce-alice=example.com",
    "python-bounce-=", "nosuchlist", "postmaster", "python-",
]
OTHER_DOMAIN_ADDRESSES = [
    "friend@elsewhere.example", "x@example.net", f"python@{HOST}.evil.test",
    f"python@sub.{HOST}", "user@bücher.example", "jörg@example.net", "a@xn--bcher-kva.example",
    '"python@lists.example.org"@elsewhere.example',
]

local_text = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00\r\n@ <>"
    ),
    min_size=1,
    max_size=40,
)

foreign_rcpt = st.one_of(
    st.sampled_from(OTHER_DOMAIN_ADDRESSES),
    st.builds(lambda l: f"{l}@elsewhere.example", st.from_regex(r"[a-z0-9.+-]{1,30}", fullmatch=True)),
)
host_rcpt = st.one_of(
    st.builds(lambda l: f"{l}@{HOST}", st.sampled_from(LIST_LOCALS)),
    st.builds(lambda l: f"{l}@{HOST}", st.from_regex(r"[a-z0-9.+=-]{1,40}", fullmatch=True)),
    st.builds(lambda l: f"python-{l}@{HOST}", local_text),
)
recipients = st.lists(st.one_of(host_rcpt, foreign_rcpt), min_size=1, max_size=5)

senders = st.one_of(
    st.sampled_from(
        [
            "<>", "", "alice@example.com", "MAILER-DAEMON@mx.example.net", "bob+tag@example.net",
            '"quoted local"@example.net', '"a@b"@example.net', "jörg@example.net", "x@bücher.example",
            "owner-list@example.net", "a" * 64 + "@example.net", "member@example.com",
            "python-info@lists.example.org", "Alice@Example.COM",
        ]
    ),
    st.builds(lambda l: f"{l}@example.net", local_text),
)


# --------------------------------------------------------------------- messages
HEADER_NAMES = [
    "Subject", "From", "To", "Cc", "Bcc", "Reply-To", "Message-ID", "In-Reply-To", "References",
    "Date", "Content-Type", "Content-Transfer-Encoding", "MIME-Version", "X-Mailer", "Received",
    "Comments", "Keywords", "Sender", "Return-Path", "Precedence", "Auto-Submitted", "List-Id",
    GENERATED_HEADER,
]
INJECTIONS = [
    "x\r\nBcc: victim@example.net", "\r\nTo: victim@example.net", "x\nCc: v@x.test", "x\rBcc: v@x.test",
    "x\r\n\r\ninjected body", "a\x00b", "\u2028Bcc: v@x.test", "x\x85Cc: v@x.test", "end\n",
]


def encoded_word(payload: str, charset: str, q: bool) -> str:
    data = payload.encode("utf-8", "surrogatepass")
    if q:
        text = "".join(
            chr(b) if (0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A) else f"={b:02X}"
            for b in data
        )
    else:
        text = base64.b64encode(data).decode("ascii")
    return f"=?{charset}?{'Q' if q else 'B'}?{text}?="


plain_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
encoded_value = st.builds(
    lambda pre, payload, charset, q: f"{pre}{encoded_word(payload, charset, q)}",
    st.sampled_from(["", "Re: ", "x "]),
    st.one_of(st.sampled_from(INJECTIONS), st.text(max_size=30)),
    st.sampled_from(["UTF-8", "utf-8", "iso-8859-1", "us-ascii", "bogus-charset", "utf-8*en"]),
    st.booleans(),
)
address_value = st.builds(
    lambda name, addr: f"{name} <{addr}>" if name else addr,
    st.sampled_from(["", "Eve", '"Eve, Mallory"', "=?utf-8?q?=0D=0ABcc:_v@x.test?="]),
    st.sampled_from(["eve@example.net", "victim@example.net", f"python@{HOST}", "a@b", "<>"]),
)
msgid_value = st.sampled_from(["<a@b.example>", "<x@y> <z@w>", "<broken", "<" + "m" * 300 + "@x>", ""])


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    value = draw(
        st.one_of(
            plain_value.map(str.encode),
            encoded_value.map(str.encode),
            address_value.map(str.encode),
            msgid_value.map(str.encode),
            st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),  # 8-bit, NUL
            st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),  # raw UTF-8 / controls
            st.integers(min_value=1000, max_value=3000).map(lambda n: b"word " * (n // 5)),  # long line
        )
    )
    if draw(st.booleans()) and b" " in value.strip():
        # fold at a random space: continuation lines start with white space
        cut = draw(st.integers(min_value=0, max_value=value.count(b" ") - 1))
        pieces = value.split(b" ")
        value = b" ".join(pieces[: cut + 1]) + b"\n\t" + b" ".join(pieces[cut + 1:])
    return value


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(extra top-level headers, body) -- plain text, 8-bit, long lines, or multipart."""
    kind = draw(st.sampled_from(["text", "binary", "long", "multipart", "broken-multipart"]))
    if kind == "text":
        return [], draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "binary":
        return [], draw(st.binary(max_size=200))
    if kind == "long":
        return [], b"x" * draw(st.integers(min_value=990, max_value=5000)) + b"\n"
    boundary = draw(st.sampled_from([b"b1", b"==x==", b"a'b", b"", b"--"]))
    parts = draw(st.lists(st.text(max_size=50), min_size=0, max_size=4))
    ctype = b'multipart/mixed; boundary="' + boundary + b'"'
    if draw(st.booleans()):
        ctype += b'; boundary="other"'
    body = b"preamble\n"
    for p in parts:
        body += b"--" + boundary + b"\nContent-Type: text/plain; charset=utf-8\n\n" + p.encode("utf-8", "surrogatepass") + b"\n"
    if kind == "multipart":
        body += b"--" + boundary + b"--\n"
    headers = [(b"MIME-Version", b"1.0"), (b"Content-Type", ctype)]
    return headers, body


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=10))
    headers = [(n.encode(), draw(header_values())) for n in names]
    extra, body = draw(bodies())
    headers = draw(st.permutations(headers + extra))
    eol_style = draw(st.sampled_from(["crlf", "lf", "mixed"]))
    lines = [n + b": " + v for n, v in headers]
    if eol_style == "mixed":
        eols = draw(st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=len(lines) + 1, max_size=len(lines) + 1))
        head = b"".join(line.replace(b"\n", e) + e for line, e in zip(lines, eols))
        return head + eols[-1] + body
    eol = b"\r\n" if eol_style == "crlf" else b"\n"
    head = b"".join(line.replace(b"\n", eol) + eol for line in lines)
    return head + eol + body.replace(b"\n", eol)


def envelope_or_none(sender: str, rcpts: list[str]) -> Envelope | None:
    try:
        return Envelope(sender, tuple(rcpts))
    except AddressError:
        return None


# --------------------------------------------------------------------- property A
@PROPERTY_SETTINGS
@given(
    sender=senders,
    rcpts=recipients,
    raw=raw_messages(),
    sender_is_member=st.booleans(),
    other_member=st.booleans(),
)
def test_process_never_fails_and_outbox_holds_only_what_lamsonfilter_set(
    sender: str, rcpts: list[str], raw: bytes, sender_is_member: bool, other_member: bool
) -> None:
    """A (S3, X1, L2, F1): no exception, no error decision, no injected header in any outbox message."""
    env = envelope_or_none(sender, rcpts)
    if env is None:  # refused cleanly before any processing (S6)
        return
    members = tuple(
        m for m, on in ((env.sender, sender_is_member and env.sender != ""), ("member@example.com", other_member)) if on
    )
    t = new_tester(members)
    result = t.send(sender, rcpts, raw=raw)
    decision = result.decision
    assert isinstance(result.request.defects, tuple)  # X1: parse problems are data
    assert result.request.ambiguous_mime in (True, False)
    assert decision.error is None, decision.error
    assert not decision.is_tempfail, decision
    for o in decision.outcomes:
        if o.action is Action.REJECT:
            assert o.code == 550 and o.enhanced == "5.1.1"  # unknown address at our host
            assert t.app.owns(o.recipient)
        elif o.route is None:
            assert o.action is Action.DELIVER and not t.app.owns(o.recipient)
    routed = sum(1 for o in decision.outcomes if o.route is not None)
    event(f"decision: {decision.kind}")
    for kind in sorted({m.kind for m in decision.outbox}):
        event(f"outbox has a {kind}")
    if any("suppressed" in n for n in decision.notes):
        event("a reply was suppressed")
    assert len([m for m in decision.outbox if m.kind == "reply"]) <= routed

    for m in decision.outbox:
        assert_crlf_only(m.raw)
        head = header_block(m.raw)
        names = field_names(head)
        assert GENERATED_HEADER.lower() in names  # L2: everything generated is marked
        if m.kind == "reply":
            assert m.sender == ""  # MAIL FROM:<> (A3)
            assert m.recipients == (env.sender,)  # only the envelope sender (S2)
            assert b"\x00" not in m.raw
            assert set(names) <= REPLY_FIELDS, names
            assert len(names) == len(set(names)), names
            assert all(len(line) <= 998 for line in m.raw.split(b"\r\n"))
            parsed = parse(m.raw)
            assert [a for _n, a in getaddresses([str(v) for v in parsed.get_all("To", [])])] == [env.sender]
            assert parsed.get_all("Bcc") is None and parsed.get_all("Cc") is None
        else:
            # a list post: lamsonfilter's own lines, then the poster's bytes (CRLF)
            assert m.kind == "message"
            assert m.recipients[0].lower() in {x.lower() for x in members}
            original = crlf(raw)
            assert m.raw.endswith(original)
            prefix = m.raw[: len(m.raw) - len(original)]
            assert prefix.endswith(b"\r\n")
            assert set(field_names(prefix[:-2])) <= POST_PREFIX_FIELDS


# --------------------------------------------------------------------- property B
@PROPERTY_SETTINGS
@given(sender=senders, rcpts=st.lists(foreign_rcpt, min_size=1, max_size=5), raw=raw_messages())
def test_unchanged_mail_passes_byte_for_byte(sender: str, rcpts: list[str], raw: bytes) -> None:
    """B (R10): mail to other domains is delivered as the very bytes received, never re-serialised."""
    if envelope_or_none(sender, rcpts) is None:
        return
    t = new_tester()
    result = t.send(sender, rcpts, raw=raw)
    assert result.decision.kind == "deliver"
    assert result.decision.outbox == ()
    assert result.output is result.request.raw


@PROPERTY_SETTINGS
@given(sender=senders, rcpts=recipients, raw=raw_messages())
def test_handled_mail_is_never_rewritten(sender: str, rcpts: list[str], raw: bytes) -> None:
    """B (R10): the example app changes no message, so the passed-on bytes equal the input."""
    if envelope_or_none(sender, rcpts) is None:
        return
    result = new_tester().send(sender, rcpts, raw=raw)
    assert not result.decision.changes_message
    assert result.output == raw


# --------------------------------------------------------------------- property C
C_NAMES = ["Subject", "To", "X-A", "X-B", "Received", "DKIM-Signature"]


@st.composite
def field_lists(draw: st.DrawFn) -> list[tuple[str, str, list[str]]]:
    """Header fields as (name, first-line value, continuation lines)."""
    fields = []
    for name in draw(st.lists(st.sampled_from(C_NAMES), max_size=8)):
        value = draw(plain_value)
        cont = draw(st.lists(plain_value.map(lambda v: "\t" + v.strip() if v.strip() else " x"), max_size=2))
        fields.append((name, value, cont))
    return fields


change_values = st.one_of(
    plain_value,
    st.text(
        alphabet=st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp")), max_size=80
    ).filter(lambda v: len(v.encode()) < 200),
)
header_changes = st.lists(
    st.builds(
        lambda op, name, value, index: HeaderChange(op, name, None if op == "remove" else value, index),
        st.sampled_from(["add", "change", "remove"]),
        st.sampled_from(C_NAMES + ["X-New"]),
        change_values,
        st.integers(min_value=1, max_value=3),
    ),
    max_size=6,
)


def split_fields(head: bytes, eol: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.split(eol):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += eol + line
        else:
            fields.append(line)
    return fields


def decoded(field: bytes) -> tuple[str, str]:
    name, _c, value = field.decode("ascii").partition(":")
    unfolded = re.sub(r"\r?\n[ \t]", " ", value)
    return name, str(make_header(decode_header(unfolded.strip())))


@PROPERTY_SETTINGS
@given(
    fields=field_lists(),
    changes=header_changes,
    body=st.one_of(
        st.binary(max_size=300),
        st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"x", b" ", b"\x00", b"\xff"]), max_size=40).map(b"".join),
    ),
    eol=st.sampled_from([b"\r\n", b"\n"]),
    new_body=st.one_of(st.none(), st.binary(max_size=50)),
)
def test_apply_keeps_untouched_lines_and_body(
    fields: list[tuple[str, str, list[str]]],
    changes: list[HeaderChange],
    body: bytes,
    eol: bytes,
    new_body: bytes | None,
) -> None:
    """C (R10, X4): header edits are textual; every untouched field and the body keep their bytes."""
    originals = [
        (f"{n}: {v}".encode() + b"".join(eol + c.encode() for c in cont)) for n, v, cont in fields
    ]
    raw = b"".join(f + eol for f in originals) + eol + body
    decision = Decision((Outcome("a@example.org", Action.DELIVER),), header_changes=tuple(changes), body=new_body)
    out = decision.apply(raw)
    if not changes and new_body is None:
        assert out is raw
        return

    # the model: which original field (or which new value) each output field is
    model: list[tuple[str, int | str]] = [(n.lower(), i) for i, (n, _v, _c) in enumerate(fields)]
    for ch in changes:
        idx = [k for k, (n, _x) in enumerate(model) if n == ch.name.lower()]
        if ch.op == "add":
            model.append((ch.name.lower(), ch.value or ""))
        elif ch.op == "change":
            if len(idx) >= ch.index:
                model[idx[ch.index - 1]] = (ch.name.lower(), ch.value or "")
            else:
                model.append((ch.name.lower(), ch.value or ""))
        elif len(idx) >= ch.index:
            del model[idx[ch.index - 1]]

    sep = eol + eol
    if model:
        head, found, rest = out.partition(sep)
        assert found, "the blank line after the headers is missing"
    else:
        assert out.startswith(eol)
        head, rest = b"", out[len(eol):]
    assert rest == (body if new_body is None else new_body)
    got = split_fields(head, eol) if model else []
    assert len(got) == len(model)
    for field, (name, what) in zip(got, model):
        if isinstance(what, int):
            assert field == originals[what]  # untouched: the very bytes
        else:
            assert b"\r" not in field.replace(eol, b"") and b"\n" not in field.replace(eol, b"")
            got_name, got_value = decoded(field)
            assert got_name.lower() == name
            if what.isascii():
                assert field == f"{got_name}: {what}".encode()
            else:
                assert got_value == what


# --------------------------------------------------------------------- property D
hostile_locals = st.one_of(
    local_text,
    st.text(
        alphabet=st.sampled_from(list('a-=.+"\\@ ()<>,;:[]') + ["\x85", "\u2028", "\u00e9", "\u4e2d", "\ufeff", "\x7f", "\x01"]),
        max_size=400,
    ),
    st.builds(lambda n, c: c * n, st.integers(min_value=60, max_value=400), st.sampled_from(["a", "=", "-", ".", "a="])),
    st.builds(lambda s: f'"{s}"', st.text(max_size=30)),
)
hostile_domains = st.one_of(
    st.sampled_from([HOST, HOST.upper(), "lists.exämple.org", "xn--lists-example.org", "bücher.example", f"{HOST}.", f"[{HOST}]", ""]),
    st.text(alphabet="abc.-é", max_size=300),
)


@PROPERTY_SETTINGS
@given(local=hostile_locals, domain=hostile_domains, prefix=st.sampled_from(["", "python-", "python-bounce-", "python-confirm-"]))
def test_routing_hostile_addresses_never_raises(local: str, domain: str, prefix: str) -> None:
    """D (S6, S7, F3): any address routes to a match or to nothing, the same each time; processing stays clean."""
    t = new_tester()
    address = f"{prefix}{local}@{domain}"
    first = t.app.router.match(address)
    again = t.app.router.match(address)
    assert (first is None) == (again is None)
    if first is not None:
        assert first.route is again.route and first.args == again.args
    assert isinstance(t.app.router.matches(address), list)
    try:
        request = MailRequest(Envelope("eve@example.net", (address,)), b"Subject: hi\r\n\r\nhi\r\n")
    except AddressError:
        return  # a clean refusal: too long or control characters
    decision = t.app.process(request, now=NOW)
    assert decision.error is None and not decision.is_tempfail


def test_near_miss_addresses_of_maximum_length_route_without_backtracking() -> None:
    """D (S7, F3): near misses of the longest allowed length (254) against every route; a catastrophic
    pattern would hang here."""
    t = new_tester()
    router: Router = t.app.router
    at_host = "@" + HOST
    fill = MAX_ADDRESS_LENGTH - len(at_host)
    near_misses = [
        "a" * MAX_ADDRESS_LENGTH,
        "python-bounce-" + "a=" * ((fill - 14) // 2) + at_host,
        "python-bounce-" + "=" * (fill - 14) + at_host,
        "python-confirm-" + "a" * (fill - 15) + at_host,
        "python-" + "-" * (fill - 7) + at_host,
        "python" + "-python" * ((fill - 6) // 7) + at_host,
        ("a" * fill + at_host)[:MAX_ADDRESS_LENGTH - 1] + "!",
        "python-" + "a" * (MAX_ADDRESS_LENGTH - 7 - len(at_host) - 1) + "@" + HOST[:-1] + "!",
        "p" * (MAX_ADDRESS_LENGTH - 20) + "@" + "l" * 19,
    ]
    for address in near_misses:
        assert len(address) <= MAX_ADDRESS_LENGTH
        router.match(address)
        router.matches(address)
    assert router.match("x" * (MAX_ADDRESS_LENGTH + 1) + at_host) is None  # over the limit: matches nothing
