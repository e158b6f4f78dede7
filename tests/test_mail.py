"""Envelope and MailRequest: the raw bytes are kept, parsing is lazy and never raises."""

import pytest

from lamsonfilter.mail import AddressError, Envelope, MailRequest, normalize_address, split_address

RAW = (
    b"Return-Path: <bounce@example.org>\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net, Carol <carol@example.net>\r\n"
    b"Cc: dave@example.net\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"\r\n"
    b"\r\nbody starts with a blank line\r\n"
)


def test_envelope_normalises_brackets_and_null_sender():
    env = Envelope("<>", ("<bob@example.net>",))
    assert env.sender == "" and env.is_null_sender
    assert env.recipients == ("bob@example.net",)


@pytest.mark.parametrize("bad", ["a" * 400 + "@example.org", "a\r\nb@example.org", "x\x00@y"])
def test_hostile_addresses_are_refused(bad):
    with pytest.raises(AddressError):
        normalize_address(bad)


def test_the_path_limit_is_256_octets_with_the_angle_brackets():
    """RFC 5321 §4.5.3.1.3: a 254-octet address (256 with <>) passes, 255 octets do not -- counted
    in UTF-8 octets, so 130 two-octet characters are over the limit although they are 140 characters."""
    domain = "@example.org"
    assert normalize_address("<" + "a" * (254 - len(domain)) + domain + ">").endswith(domain)
    with pytest.raises(AddressError, match="254 octets"):
        normalize_address("a" * (255 - len(domain)) + domain)
    utf8 = "ö" * 128 + domain  # 140 characters, 268 octets
    assert len(utf8) <= 254 < len(utf8.encode())
    with pytest.raises(AddressError):
        normalize_address(utf8)
    long_local = "SRS0=HHH=TT=example.net=" + "x" * 60 + domain  # local part over 64: accepted (SRS)
    assert normalize_address(long_local) == long_local


def test_split_address_lowercases_domain_only():
    assert split_address("Foo@Example.ORG") == ("Foo", "example.org")
    assert split_address("postmaster") == ("postmaster", "")


def test_from_bytes_takes_envelope_from_headers():
    req = MailRequest.from_bytes(RAW)
    assert req.sender == "bounce@example.org"
    assert req.recipients == ("bob@example.net", "carol@example.net", "dave@example.net")


def test_explicit_envelope_wins_over_headers():
    req = MailRequest.from_bytes(RAW, sender="", recipients=["x@example.com"], queue_id="ABC")
    assert req.sender == "" and req.recipients == ("x@example.com",) and req.queue_id == "ABC"


def test_raw_bytes_are_kept_and_body_split_exactly():
    req = MailRequest.from_bytes(RAW)
    assert req.raw is RAW
    assert req.message["Subject"] == "café"
    assert req.header_block.endswith(b"Subject: =?utf-8?q?caf=C3=A9?=\r\n")
    assert req.body_bytes == b"\r\nbody starts with a blank line\r\n"
    assert req.header_block + b"\r\n" + req.body_bytes == RAW


def test_parse_problems_are_data_not_exceptions():
    raw = (
        b"Content-Type: multipart/mixed; boundary=\"AAA\"; boundary=\"BBB\"\r\n"
        b"Content-Type: text/plain\r\n\r\n--BBB\r\nx\r\n--BBB--\r\n"
    )
    req = MailRequest.from_bytes(raw, sender="a@b.example", recipients=["c@d.example"])
    assert "DuplicateContentType" in req.defects
    assert "DuplicateBoundary" in req.defects
    assert req.ambiguous_mime


def test_clean_message_is_not_ambiguous():
    req = MailRequest.from_bytes(RAW)
    assert not req.ambiguous_mime
    assert req.header("X-Missing", "none") == "none"


def test_nul_and_bare_lf_do_not_crash():
    raw = b"Subject: a\x00b\nFrom: x@y\n\nbody\x00\n"
    req = MailRequest.from_bytes(raw, sender="x@y.example", recipients=["z@w.example"])
    assert isinstance(req.defects, tuple)
    assert req.body_bytes == b"body\x00\n"


def test_ambiguous_mime_is_answered_without_parsing_a_single_part_message():
    plain = MailRequest.from_bytes(b"Subject: x\r\nContent-Type: text/plain\r\n\r\nhi\r\n",
                                   sender="a@b.example", recipients=["c@d.example"])
    assert plain.ambiguous_mime is False
    assert "message" not in plain.__dict__  # the log line of routed mail must not start a parse
    for raw in (b"Content-Type: text/plain\r\nContent-Type: text/html\r\n\r\nhi\r\n",
                b'Content-Type: multipart/mixed; boundary="A";\r\n boundary="B"\r\n\r\n--A\r\n\r\nx\r\n--A--\r\n'):
        assert MailRequest.from_bytes(raw, sender="a@b.example", recipients=["c@d.example"]).ambiguous_mime
