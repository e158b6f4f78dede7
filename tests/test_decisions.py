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
