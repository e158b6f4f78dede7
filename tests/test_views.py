"""Views (Mako templates) and Response (the message builder), including header injection."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, MIMEPart
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamsonfilter import views as views_module
from lamsonfilter.decisions import HeaderValueError
from lamsonfilter.mail import MailRequest
from lamsonfilter.views import Response, ViewError, Views, check_decoded_header_value

INJECTING_SUBJECT = "=?UTF-8?Q?x=0D=0ABcc:_v@x.test?="


@pytest.fixture
def tdir(tmp_path: Path) -> Path:
    d = tmp_path / "templates"
    (d / "sub").mkdir(parents=True)
    (d / "welcome.msg").write_text("Hello ${name},\nwelcome to ${listname}.\n", encoding="utf-8")
    (d / "welcome.html").write_text("<p>Hello ${name}</p>\n", encoding="utf-8")
    (d / "raw.html").write_text("<p>${name | n}</p>\n", encoding="utf-8")
    (d / "sub" / "nested.msg").write_text("nested ${x}\n", encoding="utf-8")
    (d / "utf8.msg").write_text("Grüße, ${name} — ✓\n", encoding="utf-8")
    (d / "broken.msg").write_text("% if x:\nno endif\n", encoding="utf-8")
    (d / "boom.msg").write_text("${1 // 0}\n", encoding="utf-8")
    (d / ".hidden.msg").write_text("secret\n", encoding="utf-8")
    return d


def parse(raw: bytes) -> EmailMessage:
    """Parse wire bytes (CRLF) back; `text()` gives a part's text with LF line ends."""
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


def header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].decode().lower()
        for line in head.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]


def text(part: MIMEPart) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def assert_wire_format(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# --------------------------------------------------------------------- Views
def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ViewError, match="nope"):
        Views([missing])


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file.msg"
    f.write_text("x")
    with pytest.raises(ViewError, match="file.msg"):
        Views([f])


def test_no_directories() -> None:
    with pytest.raises(ViewError):
        Views([])


def test_single_path_string_is_one_directory(tdir: Path) -> None:
    assert Views(str(tdir)).render("sub/nested.msg", x=1) == "nested 1\n"


def test_render_with_variables(tdir: Path) -> None:
    views = Views([tdir])
    assert views.render("welcome.msg", name="Alice", listname="python") == (
        "Hello Alice,\nwelcome to python.\n"
    )


def test_render_utf8_template(tdir: Path) -> None:
    assert Views([tdir]).render("utf8.msg", name="Zoë") == "Grüße, Zoë — ✓\n"


def test_directories_are_searched_in_order(tdir: Path, tmp_path: Path) -> None:
    override = tmp_path / "override"
    override.mkdir()
    (override / "welcome.msg").write_text("Hi ${name}\n")
    views = Views([override, tdir])
    assert views.render("welcome.msg", name="A") == "Hi A\n"
    assert views.render("sub/nested.msg", x=2) == "nested 2\n"


def test_missing_template_error_names_it_and_the_directories(tdir: Path) -> None:
    with pytest.raises(ViewError, match=r"template 'x\.msg' not found in .*templates"):
        Views([tdir]).render("x.msg")


def test_undefined_variable_is_an_error_naming_the_template(tdir: Path) -> None:
    with pytest.raises(ViewError, match="welcome.msg") as info:
        Views([tdir]).render("welcome.msg", name="Alice")  # no `listname`
    assert isinstance(info.value.__cause__, NameError)


def test_render_exception_is_chained(tdir: Path) -> None:
    with pytest.raises(ViewError, match="boom.msg") as info:
        Views([tdir]).render("boom.msg")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_syntax_error_names_the_template(tdir: Path) -> None:
    with pytest.raises(ViewError, match="broken.msg") as info:
        Views([tdir]).render("broken.msg", x=1)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("name", ["../templates/welcome.msg", "/etc/passwd", "sub/../../x", ""])
def test_names_outside_the_directories_are_refused(tdir: Path, name: str) -> None:
    views = Views([tdir])
    with pytest.raises(ViewError):
        views.render(name, name="x", listname="y")
    assert views.missing([name]) == [name]


def test_missing_reports_only_absent_templates(tdir: Path) -> None:
    views = Views([tdir])
    assert views.missing(["welcome.msg", "nope.msg", "sub/nested.msg", "sub/no.msg"]) == [
        "nope.msg",
        "sub/no.msg",
    ]
    assert views.missing([]) == []


def test_names_lists_templates_but_not_hidden_files(tdir: Path) -> None:
    names = Views([tdir]).names()
    assert "welcome.msg" in names and "sub/nested.msg" in names
    assert ".hidden.msg" not in names
    assert names == sorted(names)


def test_no_compiled_modules_are_written(tdir: Path) -> None:
    before = sorted(p.name for p in tdir.rglob("*"))
    views = Views([tdir])
    views.render("welcome.msg", name="a", listname="b")
    views.render("welcome.html", name="a")
    assert sorted(p.name for p in tdir.rglob("*")) == before


def test_html_templates_escape_by_default(tdir: Path) -> None:
    views = Views([tdir])
    assert views.render("welcome.html", name="<b>&") == "<p>Hello &lt;b&gt;&amp;</p>\n"
    assert views.render("raw.html", name="<b>") == "<p><b></p>\n"
    # text templates are not HTML: no escaping
    assert views.render("sub/nested.msg", x="<b>") == "nested <b>\n"


def test_respond_renders_body_and_headers(tdir: Path) -> None:
    response = Views([tdir]).respond(
        "welcome.msg",
        {"name": "Alice", "listname": "python"},
        From="python-help@lists.example.org",
        To="alice@example.com",
        Subject="Welcome",
    )
    msg = response.to_message()
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "Hello Alice,\nwelcome to python.\n"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Welcome"


def test_respond_with_html_template(tdir: Path) -> None:
    response = Views([tdir]).respond(
        "welcome.msg",
        {"name": "A<", "listname": "l"},
        html_template="welcome.html",
        From="a@example.org",
        To="b@example.org",
        Subject="s",
    )
    msg = response.to_message()
    assert msg.get_content_type() == "multipart/alternative"
    html = msg.get_body(("html",))
    assert html is not None and "Hello A&lt;" in html.get_content()


def test_respond_template_errors_surface_as_view_error(tdir: Path) -> None:
    with pytest.raises(ViewError, match="nope.msg"):
        Views([tdir]).respond("nope.msg", {}, From="a@x.test", To="b@x.test", Subject="s")


# --------------------------------------------------------------------- Response
def test_plain_text_message_has_date_message_id_and_mime_version() -> None:
    response = Response(
        To="bob@example.net", From="Alice <alice@example.org>", Subject="Hi", Body="hello\n"
    )
    raw = response.to_bytes()
    assert_wire_format(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain"
    assert text(msg) == "hello\n"
    assert msg["Date"] is not None
    assert msg["MIME-Version"] == "1.0"
    assert str(msg["Message-ID"]).endswith("@example.org>")
    assert header_names(raw)[:3] == ["from", "to", "subject"]


def test_message_id_domain_falls_back_without_a_usable_from() -> None:
    msg = Response(To="b@x.test", From="nobody", Subject="s").to_message()
    assert str(msg["Message-ID"]).endswith("@lamsonfilter.invalid>")


def test_given_date_and_message_id_are_kept() -> None:
    r = Response(
        To="b@x.test",
        From="a@x.test",
        Subject="s",
        Date="Mon, 01 Jan 2024 00:00:00 +0000",
        Message_ID="<fixed@x.test>",
    )
    msg = r.to_message()
    assert msg["Message-ID"] == "<fixed@x.test>"
    assert msg.get_all("Date") == ["Mon, 01 Jan 2024 00:00:00 +0000"]


def test_html_only_and_alternative() -> None:
    html_only = Response(To="b@x.test", From="a@x.test", Subject="s", Html="<p>x</p>").to_message()
    assert html_only.get_content_type() == "text/html"
    both = Response(To="b@x.test", From="a@x.test", Subject="s", Body="x", Html="<p>x</p>")
    msg = parse(both.to_bytes())
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_attachments_make_multipart_mixed() -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s", Body="see attached\n")
    data = bytes(range(256)) * 20
    r.attach("blob.bin", "application/octet-stream", data)
    r.attach("notes.txt", "text/plain", "ünïcode " * 300, disposition="inline")
    raw = r.to_bytes()
    assert_wire_format(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_parts())
    assert text(parts[0]) == "see attached\n"
    assert parts[1].get_filename() == "blob.bin"
    assert parts[1].get_content_disposition() == "attachment"
    assert parts[1].get_content() == data
    assert parts[2].get_content_disposition() == "inline"
    assert text(parts[2]) == "ünïcode " * 300 + "\n"


def test_attachment_with_html_body() -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s", Body="t", Html="<p>h</p>")
    r.attach("a.pdf", "application/pdf", b"%PDF-1.4")
    msg = parse(r.to_bytes())
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.walk()][1:] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]


def test_attach_validates_its_arguments() -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s")
    with pytest.raises(ValueError):
        r.attach("a", "not a type", b"")
    with pytest.raises(ValueError):
        r.attach("a", "text/plain", b"", disposition="sideways")
    with pytest.raises(HeaderValueError):
        r.attach("a\r\nBcc: v@x.test", "text/plain", b"")
    with pytest.raises(HeaderValueError):
        r.attach(INJECTING_SUBJECT, "text/plain", b"")
    assert r.attachments == []


def test_long_body_lines_are_encoded_under_998_octets() -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s", Body="y" * 5000 + "\n" + "é" * 3000)
    raw = r.to_bytes()
    assert_wire_format(raw)
    assert text(parse(raw)) == "y" * 5000 + "\n" + "é" * 3000 + "\n"


def test_headers_set_later_and_case_insensitively() -> None:
    r = Response(To=["b@x.test", "c@x.test"], From="a@x.test", Subject="s", Reply_To="r@x.test")
    r["X-Mailer"] = "lamsonfilter"
    r["x-mailer"] = "again"
    r.headers["In-Reply-To"] = "<id@x.test>"
    assert r["X-MAILER"] == "again"
    assert "reply-to" in r
    del r["In-Reply-To"]
    assert "In-Reply-To" not in r.headers
    msg = parse(r.to_bytes())
    assert msg["X-Mailer"] == "again"
    assert msg["Reply-To"] == "r@x.test"
    assert msg["To"] == "b@x.test, c@x.test"
    assert "In-Reply-To" not in msg


@pytest.mark.parametrize("name", ["Content-Type", "MIME-Version", "content-transfer-encoding"])
def test_mime_headers_are_written_by_to_message_only(name: str) -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s")
    with pytest.raises(ValueError):
        r[name] = "text/html"


def test_header_values_must_be_strings() -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s")
    with pytest.raises(TypeError):
        r["X-Count"] = 3  # type: ignore[assignment]


# --------------------------------------------------------------------- injection
@pytest.mark.parametrize(
    "value",
    [
        "x\r\nBcc: v@x.test",
        "x\nBcc: v@x.test",
        "x\rBcc: v@x.test",
        "x\x00y",
        "x\u2028Bcc: v@x.test",
        "x\x85Bcc: v@x.test",
        "x\x0bBcc: v@x.test",
        INJECTING_SUBJECT,
        "Re: " + INJECTING_SUBJECT,
        "=?utf-8?b?eA0KQmNjOiB2QHgudGVzdA==?=",  # base64 of "x\r\nBcc: v@x.test"
        "=?utf-8?q?x=0ABcc:_v@x.test?=",  # a bare LF
        "=?UTF-8?Q?x =0D=0ABcc:_v@x.test?=",  # whitespace inside the word (CPython accepts it)
        "=?utf-16?b?AHgADQAKAEI=?=",  # "x\r\nB" in UTF-16
        "=?iso-8859-1?q?x=00y?=",
        "=?utf-8*en?q?x=0D=0Ay?=",  # RFC 2231 language tag
        "=?utf-8?q?=3D=3Futf-8=3Fq=3Fx=3D0D=3D0Ay=3F=3D?=",  # an encoded word inside one
        "=?unknown-charset?q?x=0D=0Ay?=",
        "x" * 1000,
    ],
)
def test_injecting_values_are_refused_everywhere(value: str) -> None:
    with pytest.raises(HeaderValueError):
        Response(To="b@x.test", From="a@x.test", Subject=value)
    with pytest.raises(HeaderValueError):
        Response(To="b@x.test", From="a@x.test", Subject="s", X_Note=value)
    r = Response(To="b@x.test", From="a@x.test", Subject="s")
    with pytest.raises(HeaderValueError):
        r["Subject"] = value
    with pytest.raises(HeaderValueError):
        r.headers["X-Other"] = value
    with pytest.raises(HeaderValueError):
        Response(To=f"Name {value} <b@x.test>", From="a@x.test", Subject="s")
    assert r["Subject"] == "s"


@pytest.mark.parametrize(
    "value",
    [
        "plain subject",
        "=?utf-8?q?Gr=C3=BC=C3=9Fe?=",
        "Re: =?ISO-8859-1?Q?Caf=E9?= au lait",
        "tab\tinside",
        "ünïcödé ✓",
        "a=?not an encoded word",
    ],
)
def test_harmless_values_pass(value: str) -> None:
    check_decoded_header_value("Subject", value)
    raw = Response(To="b@x.test", From="a@x.test", Subject=value).to_bytes()
    assert header_names(raw).count("subject") == 1


@pytest.mark.parametrize("name", ["Bad Name", "Bad:Name", "", "Ü"])
def test_invalid_header_names_are_refused(name: str) -> None:
    r = Response(To="b@x.test", From="a@x.test", Subject="s")
    with pytest.raises(HeaderValueError):
        r[name] = "v"


INCOMING = (
    b"From: Mallory <mallory@evil.test>\r\n"
    b"To: help@lists.example.org\r\n"
    b"Subject: =?UTF-8?Q?x=0D=0ABcc:_v@x.test?=\r\n"
    b"Message-ID: <1@evil.test>\r\n"
    b"\r\n"
    b"please help\r\n"
)


def _build_reply(subject: str) -> bytes:
    response = Response(
        To="mallory@evil.test",
        From="help@lists.example.org",
        Subject="Re: " + subject,
        Body="We got your message.\n",
    )
    return response.to_bytes()


def test_subject_copied_from_incoming_mail_never_injects_bcc(tdir: Path) -> None:
    """CVE-2024-6923: the subject decodes to CR LF; no Bcc: line may reach the wire."""
    request = MailRequest.from_bytes(INCOMING)
    decoded = request.header("Subject")  # what a handler usually copies: CR LF included
    as_received = [v for k, v in request.message.raw_items() if k == "Subject"][0]
    for incoming_subject in (decoded, as_received, str(as_received).strip()):
        produced: list[bytes] = []
        with pytest.raises(HeaderValueError):
            produced.append(_build_reply(incoming_subject))
        # the same through a template, as a handler would write it
        with pytest.raises(HeaderValueError):
            response = Views([tdir]).respond(
                "sub/nested.msg",
                {"x": 1},
                From="help@lists.example.org",
                To="mallory@evil.test",
                Subject="Re: " + incoming_subject,
            )
            produced.append(response.to_bytes())
        assert produced == []  # nothing was serialised, so nothing was injected


def test_serialisation_check_catches_what_the_value_check_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: even with the value check switched off, to_bytes never
    returns a header block with an injected Bcc: line (on CPython versions with
    CVE-2024-6923 it raises instead; on fixed ones the output is clean)."""
    monkeypatch.setattr(views_module, "check_decoded_header_value", lambda name, value: None)
    r = Response(To="b@x.test", From="a@x.test", Subject="Re: " + INJECTING_SUBJECT)
    try:
        raw = r.to_bytes()
    except HeaderValueError:
        return
    assert "bcc" not in header_names(raw)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.characters(codec="utf-8"), max_size=120),
    wrap=st.sampled_from(["{}", "=?utf-8?q?{}?=", "Re: =?UTF-8?B?{}?= tail", "{} =?x?q?=0D=0A?="]),
)
def test_any_subject_is_refused_or_yields_exactly_the_headers_set(text: str, wrap: str) -> None:
    value = wrap.format(text)
    try:
        r = Response(To="b@x.test", From="a@x.test", Subject=value, Body="b")
    except HeaderValueError:
        return
    raw = r.to_bytes()
    assert_wire_format(raw)
    assert header_names(raw) == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
    ]
