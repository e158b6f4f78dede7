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


# ---------------------------------------------------------------- replay records
def _full_decision() -> Decision:
    return Decision(
        outcomes=(
            Outcome("a@example.org", Action.REDIRECT, redirect_to=("b@example.org",), route="(x)@example.org",
                    handler="app.handlers.h", state_before="START", state_after="DONE"),
            Outcome("c@example.org", Action.REJECT, 550, "5.1.1", "no such user"),
        ),
        header_changes=(HeaderChange("add", "X-Seen", "yes"), HeaderChange("remove", "X-Old", None, 2)),
        body=b"new body\r\n",
        sender="bounces@example.org",
        quarantine="policy",
        notes=("one note",),
    )


def test_a_replay_record_round_trips_and_is_named() -> None:
    import json

    d = _full_decision()
    rec = json.loads(json.dumps(d.to_record()))  # stored as JSON
    assert rec["v"] == 2 and rec["outcomes"][0]["recipient"] == "a@example.org"
    assert Decision.from_record(rec) == d


def test_a_record_written_without_a_newer_field_reads_back_with_its_default() -> None:
    rec = _full_decision().to_record()
    for o in rec["outcomes"]:
        del o["state_after"], o["route"]  # fields "added later": an older writer left them out
    del rec["notes"], rec["headers"][1]["index"]
    d = Decision.from_record(rec)
    assert d.outcomes[0].state_after is None and d.outcomes[0].route is None
    assert d.outcomes[0].redirect_to == ("b@example.org",) and d.notes == ()
    assert d.header_changes[1] == HeaderChange("remove", "X-Old", None, 1)


def test_a_record_from_a_newer_writer_ignores_fields_it_does_not_know() -> None:
    rec = _full_decision().to_record()
    rec["v"] = 99
    rec["outcomes"][1]["dsn_notify"] = "never"
    rec["something_new"] = {"x": 1}
    assert Decision.from_record(rec) == _full_decision()


def test_an_old_positional_record_still_reads() -> None:
    # what version 1 wrote (positional lists), as found in a database written before
    rec = {
        "outcomes": [["a@example.org", "redirect", None, None, None, ["b@example.org"], "(x)@example.org",
                      "app.handlers.h", "START", "DONE"],
                     ["c@example.org", "reject", 550, "5.1.1", "no such user", [], None, None, None, None]],
        "headers": [["add", "X-Seen", "yes", 1], ["remove", "X-Old", None, 2]],
        "body": "bmV3IGJvZHkNCg==",
        "sender": "bounces@example.org",
        "quarantine": "policy",
        "notes": ["one note"],
        "at": 1767225600.0,
    }
    assert Decision.from_record(rec) == _full_decision()


def test_replay_record_round_trip_with_defer_and_old_records_still_load():
    import json

    d = Decision((Outcome("slow@app.example", Action.DEFER, route="slow.START", handler="slow",
                          state_before="START", state_after="START"), Outcome("tag@app.example", Action.DELIVER)))
    rec = json.loads(json.dumps(d.to_record()))
    assert rec["outcomes"][0]["action"] == "defer" and rec["v"] == 2
    assert Decision.from_record(rec) == d
    old = {"outcomes": [["tag@app.example", "drop", None, None, None, [], "r", "h", "START", "START"]]}  # v1
    assert Decision.from_record(old).outcomes[0].action is Action.DROP
