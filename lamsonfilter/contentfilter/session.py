"""The content filter's SMTP/LMTP session: aiosmtpd's state machine, made safe for Postfix.

`lamsonfilter.contentfilter.handler` delivers the messages; this module is the
protocol around it, one `FilterSMTP` (or `FilterLMTP`) per connection from
`protocol_factory`:

    loop.create_server(protocol_factory(handler), sock=sock)

aiosmtpd's defaults are overridden where they would hurt: its ``500 Error:
(…)`` exception reply (now ``451 4.3.0``), its DATA reader (unbounded
lines; `lamsonfilter.contentfilter.spool.read_data` instead), strict ASCII mode
(SMTPUTF8 is on), its ``552`` to a ``MAIL ... SIZE=`` above the limit (now
``452 4.3.4``: Postfix keeps the message instead of bouncing it), and its
EHLO (adds PIPELINING and XFORWARD).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Callable, Protocol

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, syntax
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from ..replies import TOO_BIG_FOR_SIZE
from .config import ProxyConfig
from ..smtpwire import XFORWARD_ATTRS, xtext_decode
from .spool import DataError, DataLimits, Spool, read_data


class ProxyHandler(Protocol):
    """What the session asks of its handler (`lamsonfilter.contentfilter.handler.ProxyHandler`).

    aiosmtpd also calls the handler's ``handle_EHLO``/``handle_MAIL``/``handle_RCPT``.
    """

    @property
    def config(self) -> ProxyConfig: ...
    @property
    def limits(self) -> DataLimits: ...
    async def deliver(self, envelope: "FilterEnvelope", spool: Spool) -> list[str]: ...

__all__ = ["FilterSMTP", "FilterLMTP", "FilterEnvelope", "protocol_factory"]

log = logging.getLogger("lamsonfilter.smtpproxy")

#: ``<dot-atom@domain> params``: the paths Postfix sends (RFC 5321 §4.1.2, no quoting).
_PLAIN_PATH = re.compile(r"<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                         r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)?)>(.*)\Z", re.DOTALL)
_TEMPLATES: dict[tuple[Any, ...], "FilterSMTP"] = {}
_TOO_BIG_NOW = TOO_BIG_FOR_SIZE.line.encode()


class FilterEnvelope(SMTPEnvelope):
    """aiosmtpd's envelope plus the XFORWARD attributes of this transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.xforward: dict[str, str] = {}
        #: (replay key, attempt number) once `AttemptLog.begin` counted this delivery (poison counting)
        self.attempt: tuple[str, int] | None = None
        #: ``time.monotonic()`` when the upstream gets 451 for taking too long (set by `deliver`)
        self.deadline: float | None = None


class FilterSMTP(SMTP):
    """aiosmtpd's SMTP machine with a safe DATA reader and XFORWARD (see the module docstring)."""

    def __init__(self, handler: "ProxyHandler", **kwargs: Any) -> None:
        # aiosmtpd's __init__ introspects self and the handler (inspect.getmembers,
        # dir) on every connection: about 1 ms of CPU, half of what a message costs.
        # Its result only depends on the class and the handler, so it is computed
        # once on a template instance that never sees a connection, and copied.
        key = (type(self), id(handler), tuple(sorted(kwargs.items())))
        template = _TEMPLATES.get(key)
        if template is None:
            template = _TEMPLATES[key] = object.__new__(type(self))
            SMTP.__init__(template, handler, **kwargs)
        self.__dict__.update(template.__dict__)
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop,
        )
        self._smtp_methods = {name: getattr(self, "smtp_" + name) for name in template._smtp_methods}
        self._auth_methods = {}  # no AUTH on the filter port (and never without TLS)
        self._out = []
        self.proxy = handler

    _out: list[bytes]

    async def push(self, status: Any) -> None:
        """Queue a reply; write the queue when the client has no further command waiting.

        Postfix pipelines (XFORWARD, MAIL, RCPT, DATA in one packet); aiosmtpd writes
        each reply with its own send(), and on loopback each send costs the sender the
        receiver's TCP work too.  Like Postfix's smtpd, replies to pipelined commands
        go out together, in one write.  Nothing waits with replies unsent: the queue is
        written whenever no complete command line is buffered (so before every read
        that could block), and at once for 221/421 (the connection closes next).
        """
        data = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        if data.startswith(b"552 Error: message size exceeds"):  # aiosmtpd's MAIL ... SIZE= check
            data = _TOO_BIG_NOW  # 4xx: Postfix keeps the message instead of bouncing it (5.3.4)
        self._out.append(data + b"\r\n")
        pending = self._reader._buffer  # type: ignore[attr-defined]
        if b"\n" in pending and len(self._out) < 64 and not data.startswith((b"221", b"421")):
            return
        await self._flush()

    async def _flush(self) -> None:
        if self._out:
            self._writer.write(b"".join(self._out))
            self._out.clear()
            await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """A plain ``<local@domain>`` without the email package's full parser (0.2 ms a message);
        anything else (quoted local parts, comments...) goes to aiosmtpd's parser."""
        m = _PLAIN_PATH.match(arg)
        if m is not None:
            return m.group(1) or "<>", m.group(2)  # aiosmtpd's spelling of the null path
        addr, rest = super()._getaddr(arg)
        return addr, rest

    def _create_envelope(self) -> FilterEnvelope:
        return FilterEnvelope()

    _in_data = False

    def eof_received(self) -> bool | None:
        """The client half-closed.  Exim pipelines ``QUIT`` after the final dot and then
        shuts down its sending side: aiosmtpd would cancel the message being processed
        and drop the connection without a reply (Exim: "Remote host closed connection
        in response to end of data", and the message would be processed again).  During
        DATA the reply is still written; the buffered commands are served, then EOF ends
        the session."""
        if self._in_data:
            self._reader.feed_eof()
            return True  # keep the transport open for our reply
        return super().eof_received()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError) and self.transport is not None:
            self.transport.close()  # EOF in the middle of a command: the session is over
        return await super().handle_exception(error)

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix's XFORWARD (XFORWARD_README): attributes of the original client, per transaction."""
        if await self.check_helo_needed("EHLO"):
            return
        envelope = self.envelope
        assert isinstance(envelope, FilterEnvelope)
        if envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        attrs: dict[str, str] = {}
        for item in arg.split():
            name, eq, value = item.partition("=")
            value = xtext_decode(value)
            if not eq or name.upper() not in XFORWARD_ATTRS or len(value) > 255 or not value.isprintable():
                await self.push(f"501 5.5.4 Bad XFORWARD attribute: {name[:20]}")
                return
            attrs[name.upper()] = value
        envelope.xforward.update(attrs)
        await self.push("250 2.0.0 Ok")

    async def smtp_DATA(self, arg: str) -> None:
        """DATA with `lamsonfilter.contentfilter.spool.read_data`; the reply comes from `ProxyHandler.deliver`."""
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert isinstance(envelope, FilterEnvelope)
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._flush()  # the client waits for 354 before it sends the message
        self._in_data = True
        try:
            await self._data(envelope)
        finally:
            self._in_data = False
        if self._reader.at_eof() and self.transport is not None:
            self.transport.close()  # half-closed by the client and nothing left to serve

    async def _data(self, envelope: FilterEnvelope) -> None:
        try:
            spool = await read_data(self._reader, self.proxy.limits, self.proxy.config.spool_dir, self._reset_timeout)
        except DataError as exc:
            log.warning("%r: %s", self.session.peer if self.session else None, exc.reply)
            await self.push(exc.reply)
            await self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        except asyncio.IncompleteReadError:
            if self.transport is not None:
                self.transport.close()
            return
        try:
            replies = await self.proxy.deliver(envelope, spool)
        finally:
            spool.close()
        self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state, typed
        await self._push_all(replies)

    async def _push_all(self, replies: list[str]) -> None:
        if not self.proxy.config.lmtp:
            replies = replies[:1]
        self._out.extend(r.encode("utf-8") + b"\r\n" for r in replies)
        await self._flush()


class FilterLMTP(FilterSMTP, LMTP):
    """LMTP (RFC 2033): LHLO instead of EHLO, one reply per recipient after DATA."""


def protocol_factory(handler: ProxyHandler) -> Callable[[], FilterSMTP]:
    """What ``loop.create_server`` needs: a new SMTP (or LMTP) machine per connection."""
    cls = FilterLMTP if handler.config.lmtp else FilterSMTP
    size = handler.config.max_size

    def make() -> FilterSMTP:
        return cls(
            handler,
            hostname=handler.config.hostname,  # no getfqdn(): no DNS
            ident="lamsonfilter",
            data_size_limit=size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=300,
        )

    return make
