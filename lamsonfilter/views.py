"""Mail built from templates: `Views` (Mako templates) and `Response` (a message builder).

As in Lamson, the text of a reply lives in a template file, not in the
handler.  `Views` finds templates in a list of directories and renders them
with Mako; `Response` turns headers, a body, an optional HTML version and
attachments into a message with the project's one `POLICY` (CRLF line ends,
no line over 998 octets):

    views = Views(["app/templates"])
    response = views.respond(
        "welcome.msg", {"name": "Alice", "list": "python"},
        From="python-help@lists.example.org", To="alice@example.com",
        Subject="Welcome to python",
    )
    response.attach("rules.txt", "text/plain", "Be nice.\\n")
    raw = response.to_bytes()        # what the outbox sends

Templates are Mako with ``strict_undefined``: a variable the template uses
but nobody passed is an error, not an empty string.  Templates whose name
ends in ``.html``/``.htm`` are HTML-escaped by default (``${name}`` escapes,
``${name | n}`` does not); the others (``.msg``, ``.txt``...) are plain text.

Header injection: header values often carry text from the incoming mail
(``"Re: " + subject``).  Every value set on a `Response` is checked as typed
*and* once more after decoding its RFC 2047 encoded-words (both checks live
in `lamsonfilter.headercheck`), because ``=?UTF-8?Q?x=0D=0ABcc:_v@x.test?=``
contains no CR or LF as typed yet decodes to a line break, and the email
package of some CPython versions (3.11.7 among them, CVE-2024-6923) writes
such a value out as a real ``Bcc:`` line.  `Response.to_bytes` finally
verifies that the serialised header block holds exactly the headers that
were set.

Errors: template problems raise `ViewError` (the template's name in the
text, the Mako error chained as ``__cause__``); a header value that could
inject lines raises `HeaderValueError`, at the moment it is set.
"""

from __future__ import annotations

import os
import re
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

from mako import exceptions as mako_exceptions  # type: ignore[import-untyped]
from mako.lookup import TemplateLookup  # type: ignore[import-untyped]
from mako.template import Template  # type: ignore[import-untyped]

from .headercheck import HeaderValueError, check_encoded_words, check_header_value
from .mail import POLICY

__all__ = ["Views", "ViewError", "Response", "check_decoded_header_value", "serialise", "HTML_SUFFIXES"]


class ViewError(Exception):
    """A template directory or template is missing, or a template failed to compile or render."""


#: Template names with these endings are HTML-escaped by default.
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


# --------------------------------------------------------------------- templates
class Views:
    """The templates of an application, looked up in `directories` in order."""

    def __init__(self, directories: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> None:
        if isinstance(directories, (str, os.PathLike)):
            directories = [directories]
        dirs = [Path(d) for d in directories]
        if not dirs:
            raise ViewError("no template directories given")
        for d in dirs:
            if not d.is_dir():
                raise ViewError(f"template directory {str(d)!r} does not exist or is not a directory")
        self.directories: tuple[Path, ...] = tuple(dirs)
        names = [str(d) for d in dirs]
        common: dict[str, Any] = {
            "directories": names,
            "module_directory": None,  # compile in memory, never write modules to disk
            "strict_undefined": True,
            "input_encoding": "utf-8",
        }
        self._text = TemplateLookup(**common)
        self._html = TemplateLookup(default_filters=["h"], **common)

    def __repr__(self) -> str:
        return f"Views({[str(d) for d in self.directories]!r})"

    def render(self, name: str, /, **variables: Any) -> str:
        """Render template `name` with `variables`; `ViewError` when it is missing or fails.

        `name` is positional-only, so a template may use a variable called ``name``.
        """
        template = self._template(name)
        try:
            result = template.render(**variables)
        except Exception as exc:
            raise ViewError(f"cannot render template {name!r}: {type(exc).__name__}: {exc}") from exc
        return str(result)

    def respond(
        self,
        template: str,
        variables: Mapping[str, Any] | None = None,
        /,
        *,
        html_template: str | None = None,
        **headers: Any,
    ) -> "Response":
        """A `Response` whose body is `template` rendered with `variables`.

        `headers` are the Response's (``To``, ``From``, ``Subject`` and any
        other); `html_template`, if given, is rendered with the same
        variables as the HTML alternative.
        """
        values = dict(variables or {})
        body = self.render(template, **values)
        html = self.render(html_template, **values) if html_template else None
        return Response(Body=body, Html=html, **headers)

    def missing(self, names: Sequence[str]) -> list[str]:
        """Those of `names` no directory holds (for start-up checks), in the order given."""
        return [n for n in names if self._find(n) is None]

    def names(self) -> list[str]:
        """The templates available, as names for `render` (``sub/x.msg``), sorted."""
        found: set[str] = set()
        for d in self.directories:
            for path in d.rglob("*"):
                rel = path.relative_to(d)
                if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                    continue
                if path.is_file():
                    found.add(rel.as_posix())
        return sorted(found)

    # ----------------------------------------------------------------- internals
    def _find(self, name: str) -> Path | None:
        if not _valid_name(name):
            return None
        for d in self.directories:
            if (d / name).is_file():
                return d / name
        return None

    def _template(self, name: str) -> Template:
        if not _valid_name(name):
            raise ViewError(f"invalid template name {name!r}")
        if self._find(name) is None:
            where = ", ".join(str(d) for d in self.directories)
            raise ViewError(f"template {name!r} not found in {where}")
        lookup = self._html if name.lower().endswith(HTML_SUFFIXES) else self._text
        try:
            return lookup.get_template(name)
        except mako_exceptions.TopLevelLookupException as exc:
            where = ", ".join(str(d) for d in self.directories)
            raise ViewError(f"template {name!r} not found in {where}") from exc
        except Exception as exc:  # SyntaxException, CompileException, decoding errors
            raise ViewError(f"cannot compile template {name!r}: {exc}") from exc


def _valid_name(name: str) -> bool:
    """A relative name inside the template directories (no ``..``, not absolute)."""
    if not name or "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[/\\]", name)


# --------------------------------------------------------------------- header checks
def check_decoded_header_value(name: str, value: str) -> None:
    """`check_header_value`, also applied to every decoding of `value`'s RFC 2047 words.

    Raises `HeaderValueError` when the name is invalid, the value is too
    long, or the value, as typed or as any reader would decode it, holds a
    line break (CR, LF, NUL or another character ``str.splitlines`` breaks on);
    and when the email package would not write it as exactly one header field
    (or cannot write it at all).
    """
    check_header_value(name, value)
    check_encoded_words(name, value)
    _check_folding(name, value)


def _check_folding(name: str, value: str) -> None:
    """Fold the header as `POLICY` will; require one field with CRLF lines of <= 998 octets."""
    try:
        folded = POLICY.header_factory(name, value).fold(policy=POLICY)
        data = str(folded).encode("utf-8", "surrogateescape")
    except Exception as exc:  # the email package cannot write this value at all
        raise HeaderValueError(
            f"header {name} cannot be written by the email package: {exc}"
        ) from exc
    lines = data.split(b"\r\n")
    if lines[-1] != b"" or any(line[:1] not in (b" ", b"\t") for line in lines[1:-1]):
        raise HeaderValueError(f"header {name} would be written as more than one header field")
    if any(b"\r" in line or b"\n" in line or len(line) > 998 for line in lines):
        raise HeaderValueError(f"header {name} would be written with a bare CR/LF or a long line")


# --------------------------------------------------------------------- responses
#: Headers `Response.to_message` writes itself.
_MIME_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")


class ResponseHeaders(MutableMapping[str, str]):
    """A Response's headers: case-insensitive names, one value each, checked when set."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, str]] = {}  # lower name -> (name, value)

    def __setitem__(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"header {name} value must be str, not {type(value).__name__}")
        check_decoded_header_value(name, value)
        if name.lower() in _MIME_HEADERS:
            raise ValueError(f"{name} is set by Response.to_message, not by hand")
        key = name.lower()
        old = self._items.get(key)
        self._items[key] = (old[0] if old else name, value)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __delitem__(self, name: str) -> None:
        del self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, _v in self._items.values()])

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __repr__(self) -> str:
        return f"ResponseHeaders({dict(self.items())!r})"


class Response:
    """A new message or reply under construction (Lamson's ``MailResponse``).

    `To` may be one address string or a sequence of them.  Extra keyword
    headers use ``_`` for ``-`` (``Reply_To="..."`` sets ``Reply-To``);
    more can be set later with ``response["X-Whatever"] = value``.
    `Body` is the plain text, `Html` an optional HTML alternative.
    """

    def __init__(
        self,
        To: str | Sequence[str],
        From: str,
        Subject: str,
        Body: str | None = None,
        Html: str | None = None,
        **headers: str,
    ) -> None:
        self.headers = ResponseHeaders()
        self.headers["From"] = From
        self.headers["To"] = To if isinstance(To, str) else ", ".join(To)
        self.headers["Subject"] = Subject
        for name, value in headers.items():
            self.headers[name.replace("_", "-")] = value
        self.Body = Body
        self.Html = Html
        self.attachments: list[tuple[str, str, bytes | str, str]] = []

    # ----------------------------------------------------------------- headers
    def __getitem__(self, name: str) -> str:
        return self.headers[name]

    def __setitem__(self, name: str, value: str) -> None:
        self.headers[name] = value

    def __delitem__(self, name: str) -> None:
        del self.headers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.headers

    def __repr__(self) -> str:
        return (
            f"Response(To={self.headers.get('To')!r}, From={self.headers.get('From')!r}, "
            f"Subject={self.headers.get('Subject')!r}, attachments={len(self.attachments)})"
        )

    def attach(
        self,
        filename: str,
        content_type: str,
        data: bytes | str,
        disposition: str = "attachment",
    ) -> None:
        """Add an attachment (`disposition` ``attachment`` or ``inline``)."""
        check_decoded_header_value("Content-Disposition", filename)
        if not _CONTENT_TYPE.match(content_type):
            raise ValueError(f"invalid content type {content_type!r}")
        if disposition not in ("attachment", "inline"):
            raise ValueError(f"disposition must be 'attachment' or 'inline', not {disposition!r}")
        if not isinstance(data, (bytes, str)):
            raise TypeError(f"attachment data must be bytes or str, not {type(data).__name__}")
        self.attachments.append((filename, content_type.lower(), data, disposition))

    # ----------------------------------------------------------------- output
    def to_message(self) -> EmailMessage:
        """The message: text/plain, multipart/alternative (text + HTML) or
        multipart/mixed (with attachments); with Date, Message-ID, MIME-Version."""
        msg = EmailMessage(policy=POLICY)
        for name, value in self.headers.items():
            check_decoded_header_value(name, value)  # again: values may have been set directly
            try:
                msg[name] = value
            except Exception as exc:
                raise HeaderValueError(f"header {name} refused by the email package: {exc}") from exc
        if "Date" not in self.headers:
            msg["Date"] = formatdate(localtime=True)
        if "Message-ID" not in self.headers:
            msg["Message-ID"] = make_msgid(domain=_msgid_domain(self.headers.get("From", "")))

        if self.Html is not None and self.Body is not None:
            msg.set_content(self.Body)
            msg.add_alternative(self.Html, subtype="html")
        elif self.Html is not None:
            msg.set_content(self.Html, subtype="html")
        else:
            msg.set_content(self.Body or "")
        for filename, content_type, data, disposition in self.attachments:
            maintype, subtype = content_type.split("/", 1)
            if isinstance(data, str) and maintype == "text":
                msg.add_attachment(data, subtype=subtype, filename=filename, disposition=disposition)
            else:
                payload = data.encode("utf-8") if isinstance(data, str) else data
                msg.add_attachment(
                    payload, maintype, subtype, filename=filename, disposition=disposition
                )
        if "MIME-Version" not in msg:
            msg["MIME-Version"] = "1.0"
        return msg

    def to_bytes(self) -> bytes:
        """The message serialised with `POLICY` (CRLF), verified line by line.

        Raises `HeaderValueError` if the serialised header block does not
        hold exactly the headers of `to_message` (a folding bug turned a
        value into an extra header) and `ValueError` for a line over 998 octets.
        """
        return self.render()[1]

    def render(self) -> tuple[EmailMessage, bytes]:
        """`to_message` and `to_bytes` from one build (one Date, one Message-ID): building a
        reply costs about 2 ms of CPU, most of a stateful message's own work."""
        msg = self.to_message()
        raw = serialise(msg)
        _verify_serialised(raw, [k.lower() for k in msg.keys()])
        return msg, raw


#: `POLICY` with RFC 6532 UTF-8 header fields, for mail to or from a non-ASCII mailbox.
UTF8_POLICY = POLICY.clone(utf8=True)

#: The header fields that name mailboxes.
_MAILBOX_FIELDS = ("From", "Sender", "Reply-To", "To", "Cc", "Bcc")


def serialise(msg: EmailMessage) -> bytes:
    """`msg` as bytes with `POLICY` (CRLF line ends).

    When a mailbox field names a non-ASCII address (``jörg@bücher.example``),
    the header is written in UTF-8 (RFC 6532): RFC 2047 encoded words may not
    stand in an address (§5), and the relay sends such mail with SMTPUTF8.
    """
    return msg.as_bytes(policy=UTF8_POLICY if _names_utf8_mailbox(msg) else POLICY)


def _names_utf8_mailbox(msg: EmailMessage) -> bool:
    for name in _MAILBOX_FIELDS:
        values = [str(v) for v in msg.get_all(name, [])]
        if values and not all(v.isascii() for v in values):
            try:
                if any(not addr.isascii() for _n, addr in getaddresses(values)):
                    return True
            except Exception:  # noqa: BLE001 -- unreadable: written as usual, checked later
                continue
    return False


def _msgid_domain(from_value: str) -> str:
    """The domain of the From address, for the Message-ID (``lamsonfilter.invalid`` if none)."""
    try:
        pairs = getaddresses([from_value])
    except Exception:
        pairs = []
    for _display, addr in pairs:
        if "@" not in addr:
            continue
        domain = addr.rpartition("@")[2].strip().rstrip(".")
        if not domain:
            continue
        try:
            ascii_domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            continue
        if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})", ascii_domain):
            return ascii_domain.lower()
    return "lamsonfilter.invalid"


def _verify_serialised(raw: bytes, expected_names: list[str]) -> None:
    # CRLF only, on purpose (not `mail.header_end`, which also takes bare LF): our own
    # serialised output must end its header block with CRLF CRLF, and a bare LF is the fault
    end = raw.find(b"\r\n\r\n")
    head = raw[:end] if end >= 0 else raw
    if b"\r" in head.replace(b"\r\n", b"") or b"\n" in head.replace(b"\r\n", b""):
        raise HeaderValueError("serialised header block holds a bare CR or LF")
    names = [
        line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        for line in head.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]
    if names != expected_names:
        raise HeaderValueError(
            f"serialised headers {names} differ from the headers set {expected_names}"
            " (a value was written out as extra header lines)"
        )
    for line in raw.split(b"\r\n"):
        if len(line) > 998:
            raise ValueError("serialised message has a line longer than 998 octets")
