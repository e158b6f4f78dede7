"""Decision values and the textual application of header changes."""

import pytest

from lamsonfilter.decisions import (
    Action, Decision, HeaderChange, HeaderValueError, Outcome, apply_changes, check_header_value,
)


@pytest.mark.parametrize("value", ["a\r\nBcc: x@y", "a\nb", "nul\x00", "x" * 1000])
def test_header_values_that_would_inject_are_refused(value):
    with pytest.raises(HeaderValueError):
        check_header_value("Subject", value)
    with pytest.raises(HeaderValueError):
        HeaderChange("add", "Subject", value)


@pytest.mark.parametrize("name", ["Bad Name", "X:Y", "", "Ä"])
def test_bad_header_names_are_refused(name):
    with pytest.raises(HeaderValueError):
        check_header_value(name, "v")


def test_outcome_codes_are_checked():
    with pytest.raises(ValueError):
        Outcome("a@b", Action.REJECT, 451)
    with pytest.raises(ValueError):
        Outcome("a@b", Action.TEMPFAIL, 550)
    with pytest.raises(ValueError):
        Outcome("a@b", Action.REDIRECT)
    assert Outcome("a@b", Action.REJECT, 550, "5.1.1", "nope").reply == "550 5.1.1 nope"


def test_decision_is_immutable():
    d = Decision.deliver_all(["a@b.example"])
    with pytest.raises(AttributeError):
        d.error = "x"  # type: ignore[misc]


def test_apply_keeps_untouched_lines_byte_for_byte_with_lf_input():
    raw = b"Received: a\n  folded\nSubject: s\nX-A: 1\nX-A: 2\n\nbody\n"
    out = apply_changes(raw, [HeaderChange("remove", "X-A", index=2), HeaderChange("add", "X-B", "caf\u00e9")], None)
    assert out == b"Received: a\n  folded\nSubject: s\nX-A: 1\nX-B: =?utf-8?b?Y2Fmw6k=?=\n\nbody\n"


def test_change_of_missing_header_adds_it():
    out = apply_changes(b"A: 1\r\n\r\nb\r\n", [HeaderChange("change", "B", "2")], None)
    assert out == b"A: 1\r\nB: 2\r\n\r\nb\r\n"


def test_kind_summarises():
    assert Decision.deliver_all(["a@b"]).kind == "deliver"
    assert Decision((Outcome("a@b", Action.DROP),)).kind == "drop"
    assert Decision((Outcome("a@b", Action.REJECT, 550),)).kind == "reject"
    assert Decision((Outcome("a@b", Action.DELIVER),), body=b"x").kind == "modify"


# The value as typed holds no CR or LF; decoded (RFC 2047) it is "x\r\nBcc: v@x.test".
ENCODED_CRLF = [
    "=?UTF-8?Q?x=0D=0ABcc:_v@x.test?=",
    "=?UTF-8?B?eA0KQmNjOiB2QHgudGVzdA==?=",
    "Re: =?ISO-8859-1?Q?a=0Ab?= tail",
]


@pytest.mark.parametrize("value", ENCODED_CRLF)
def test_header_changes_are_checked_after_rfc2047_decoding(value):
    for op in ("add", "change"):
        with pytest.raises(HeaderValueError, match="once RFC 2047 words are decoded"):
            HeaderChange(op, "X-Original-Subject", value)


@pytest.mark.parametrize(("name", "value"), [
    ("Content-Disposition", "attachment; filename*=utf-8''a%0D%0ABcc%3A%20v@x.test"),  # RFC 2231
    ("X-Note", "a\u2028b"),  # a line break for str.splitlines, typed as is
])
def test_header_changes_refuse_other_readings_with_a_line_break(name, value):
    with pytest.raises(HeaderValueError, match="line break"):
        HeaderChange("add", name, value)


def test_ctx_add_header_refuses_an_encoded_line_break():
    from lamsonfilter import App, Handler, MailRequest, stateless

    h = Handler("copy")
    refused: list[str] = []

    @h.route("copy@app.example")
    @stateless
    def COPY(ctx):
        try:
            ctx.add_header("X-Original-Subject", "=?UTF-8?Q?x=0D=0ABcc:_v@x.test?=")
        except HeaderValueError as exc:
            refused.append(str(exc))
        ctx.add_header("X-Copied", "=?UTF-8?Q?caf=C3=A9?=")  # an ordinary encoded word passes
        ctx.deliver()

    app = App(hosts=["app.example"], handlers=[h]).start()
    raw = b"From: a@x.example\r\nTo: copy@app.example\r\nSubject: s\r\n\r\nbody\r\n"
    d = app.process(MailRequest.from_bytes(raw, sender="a@x.example", recipients=("copy@app.example",)))
    assert refused and "X-Original-Subject" in refused[0]
    assert d.header_changes == (HeaderChange("add", "X-Copied", "=?UTF-8?Q?caf=C3=A9?="),)
