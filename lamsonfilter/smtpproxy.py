"""Content-filter mode: Postfix delivers to lamsonfilter over SMTP or LMTP after queueing.

``lamsonfilter smtpproxy`` listens on 127.0.0.1:10025 (Postfix's
``content_filter = lamsonfilter:[127.0.0.1]:10025``), turns each message
into one `MailRequest`, runs `Runtime.process`, and carries out the
content filter's table (`lamsonfilter.reinjection`): reinject to
127.0.0.1:10026 (a Postfix smtpd that does not filter again), quarantine,
and only then reply.  This is the only module that imports aiosmtpd.

    config = ProxyConfig(app_dir=Path("examples/mailinglist"))
    serve(config)                       # until SIGTERM; see lamsonfilter.proxyserver

How Postfix reacts to what this module answers (integration.md §3.5):

=====================================  =========================================
we answer                              Postfix does
=====================================  =========================================
``550 5.1.1`` at RCPT (unroutable      that recipient bounces (the address was
address at an application host)        at our own domain: the bounce is right)
``250`` to the final ``.``             done; only after the reinjection
                                       listener accepted every recipient
``451 4.3.0`` to the final ``.``       keeps the message queued, retries later:
                                       reinjection refused/down, a recipient
                                       refused, a handler error, the deadline
connection closed mid-DATA             deferred (over-long line, oversize)
LMTP: one reply per recipient          per recipient: 250, 5xx (bounce) or 451
=====================================  =========================================

Over SMTP a reject decided after DATA is never a ``5xx`` (that would bounce
to a possibly forged sender): those recipients are discarded and the
message is quarantined in a Maildir.  aiosmtpd's defaults are overridden
where they would hurt: its ``500 Error: (…)`` exception reply (now
``451 4.3.0``), its DATA reader (unbounded lines, see `lamsonfilter.spool`),
strict ASCII mode (SMTPUTF8 is on), and its EHLO (adds PIPELINING and
XFORWARD).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope as SMTPEnvelope, Session, syntax

from . import faults
from .decisions import Action
from .mail import AddressError, Envelope, MailRequest, normalize_address
from .looptrace import HEAD_LIMIT, LOOP_REPLY, TraceKey
from .poison import DEFAULT_LIMIT, AttemptLog
from .postfixsetup import PostfixGuard
from .quarantine import Quarantine
from .reinjection import TEMPFAIL_REPLY, reinjection_plan
from .reinjector import XFORWARD_ATTRS, Reinjector, ReinjectionError, Transaction, xtext_decode
from .runtime import REPLAY_TTL, Runtime
from .spool import DataError, DataLimits, Spool, read_data

__all__ = ["ProxyConfig", "ProxyHandler", "FilterSMTP", "FilterLMTP", "protocol_factory", "serve",
           "MAX_RECIPIENTS"]

log = logging.getLogger("lamsonfilter.smtpproxy")

#: Recipients per transaction (Postfix sends at most $default_destination_recipient_limit, 50).
MAX_RECIPIENTS = 1000
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``lamsonfilter smtpproxy`` is started with (checked by `proxyserver.check_config`)."""

    app_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 10025)
    reinject: tuple[str, int] = ("127.0.0.1", 10026)
    lmtp: bool = False
    workers: int = 1
    database: str | None = None
    allow_remote: bool = False
    max_size: int = 10_240_000
    deadline: float = 120.0
    quarantine: Path | None = None
    spool_dir: str | None = None
    threads: int = 8
    hostname: str = "lamsonfilter.localhost"
    policy: tuple[str, int] | None = None  # the RCPT-time policy listener (lamsonfilter.policy)
    postfix_config: Path | None = None  # checked at start-up (L1): refuse a looping set-up

    @property
    def quarantine_path(self) -> Path:
        return self.quarantine or Path(self.app_dir).resolve() / "var" / "quarantine"

    @property
    def attempts_path(self) -> Path:
        """Where `lamsonfilter.poison.AttemptLog` counts failed attempts: next to the quarantine."""
        return self.quarantine_path.parent / "attempts"


#: ``<dot-atom@domain> params``: the paths Postfix sends (RFC 5321 §4.1.2, no quoting).
_PLAIN_PATH = re.compile(r"<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                         r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)?)>(.*)\Z", re.DOTALL)
_TEMPLATES: dict[tuple[Any, ...], "FilterSMTP"] = {}
_TOO_BIG_NOW = (b"452 4.3.4 Message larger than the content filter's SIZE; raise smtpproxy --max-size "
                b"(or give it --postfix-config)")


class _FilterEnvelope(SMTPEnvelope):
    """aiosmtpd's envelope plus the XFORWARD attributes of this transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.xforward: dict[str, str] = {}
        #: (replay key, attempt number) once `AttemptLog.begin` counted this delivery (R15)
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

    def _create_envelope(self) -> _FilterEnvelope:
        return _FilterEnvelope()

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
        assert isinstance(envelope, _FilterEnvelope)
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
        """DATA with `lamsonfilter.spool.read_data`; the reply comes from `ProxyHandler.deliver`."""
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert isinstance(envelope, _FilterEnvelope)
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

    async def _data(self, envelope: _FilterEnvelope) -> None:
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


class ProxyHandler:
    """aiosmtpd hooks plus the one delivery step: MailRequest → Decision → reinjection → reply."""

    def __init__(
        self,
        runtime: Runtime,
        reinjector: Reinjector,
        config: ProxyConfig,
        executor: concurrent.futures.Executor,
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.reinjector = reinjector
        self.config = config
        self.executor = executor
        self.on_outbox = on_outbox
        self.quarantine = Quarantine(config.quarantine_path)
        self.attempts = AttemptLog(config.attempts_path)
        try:  # counts of messages that left Postfix's queue long ago
            self.attempts.purge(REPLAY_TTL)
        except OSError as exc:
            log.warning("%r: cannot purge old attempt counts: %s", self.attempts, exc)
        self.limits = DataLimits(max_size=config.max_size)
        self.in_flight = 0
        self.trace = TraceKey(config.attempts_path.parent / "trace.key")
        self.guard = (PostfixGuard(config.postfix_config, lambda: self.runtime.app.settings)
                      if config.postfix_config is not None else None)

    # ------------------------------------------------------------------ hooks
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SMTPEnvelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [r[4:] for r in responses if r[4:] != "HELP"]
        lines += ["PIPELINING", "XFORWARD " + " ".join(XFORWARD_ATTRS)]
        # one string: aiosmtpd pushes each list item with its own write (a syscall each)
        return ["\r\n".join([f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"])]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str,
                          mail_options: list[str]) -> str:
        try:
            normalize_address(address)
        except AddressError as exc:
            return f"501 5.1.7 Bad sender address: {exc}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        """``550 5.1.1`` for an unroutable address at the app's hosts; Postfix bounces that recipient."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Error: too many recipients"
        try:
            addr = normalize_address(address)
        except AddressError as exc:
            return f"501 5.1.3 Bad recipient address: {exc}"
        outcome = self.runtime.check_recipient(addr)
        if outcome is not None and outcome.action is Action.REJECT:
            xf = envelope.xforward if isinstance(envelope, _FilterEnvelope) else {}
            log.info("queue_id=%s client=%s[%s] from=<%s> rcpt=<%s> refused at RCPT: %s",
                     xf.get("IDENT", "-"), xf.get("NAME", "unknown"), xf.get("ADDR", "-"),
                     envelope.mail_from or "", addr, outcome.reply)
            return outcome.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """Anything unexpected in the SMTP machine: a temporary failure, never aiosmtpd's ``500 Error: (…)``."""
        log.error("session error, answered 451: %s: %s", type(error).__name__, error)
        return TEMPFAIL_REPLY

    # ------------------------------------------------------------------ delivery
    async def deliver(self, envelope: _FilterEnvelope, spool: Spool) -> list[str]:
        """The replies to the final ``.``: one for SMTP, one per recipient for LMTP.  Never raises."""
        count = len(envelope.rcpt_tos) if self.config.lmtp else 1
        queue_id = envelope.xforward.get("IDENT", "-")
        self.in_flight += 1
        envelope.deadline = time.monotonic() + self.config.deadline
        final = False
        try:
            replies = await asyncio.wait_for(self._deliver(envelope, spool), self.config.deadline)
            final = not replies[0].startswith("4")
            return replies
        except asyncio.TimeoutError:
            log.warning("queue_id=%s deadline of %gs passed, answered 451", queue_id, self.config.deadline)
        except ReinjectionError as exc:
            log.warning("queue_id=%s reinjection failed, answered 451: %s", queue_id, exc)
            if self.runtime.metrics is not None:
                self.runtime.metrics.reinjection_failures.inc()
        except Exception as exc:  # noqa: BLE001 -- the contract: a 4xx, never a 5xx or a traceback
            log.error("queue_id=%s error, answered 451: %s: %s", queue_id, type(exc).__name__, exc)
        finally:
            self.in_flight -= 1
            self._end_attempt(envelope, final)
        return [TEMPFAIL_REPLY] * count

    async def _deliver(self, envelope: _FilterEnvelope, spool: Spool) -> list[str]:
        xf = envelope.xforward
        known = {k: v for k, v in xf.items() if v not in _UNAVAILABLE}
        addr = known.get("ADDR")
        env = Envelope(
            sender=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            client_address=addr[5:] if addr and addr.upper().startswith("IPV6:") else addr,
            client_name=known.get("NAME"),
            helo=known.get("HELO"),
            queue_id=known.get("IDENT"),
        )
        faults.reached("smtpproxy.after_data", env.queue_id)
        head = spool.getvalue() if spool.in_memory else next(spool.chunks(HEAD_LIMIT), b"")
        if self.trace.came_back(head, env.sender, env.recipients):
            return await self._came_back(envelope, spool, env)
        routed = self._needs_content(env)
        streamed = not spool.in_memory and not routed
        request = MailRequest(env, b"" if streamed else spool.getvalue())
        if routed:
            request.replay_key = self._replay_key(request)
        request.deadline = envelope.deadline  # past it, App.process commits nothing (we answer 451)
        loop = asyncio.get_running_loop()
        limit = int(self.runtime.app.settings.get("POISON_LIMIT", DEFAULT_LIMIT))
        if request.replay_key is not None and limit > 0:
            # counted durably *before* the handlers run: a kill -9 in them still counts (R15)
            n = await loop.run_in_executor(self.executor, self.attempts.begin, request.replay_key)
            envelope.attempt = (request.replay_key, n)
            if n > limit:
                return await self._quarantine_poison(request, n - 1)
        decision = await loop.run_in_executor(
            self.executor, functools.partial(self.runtime.process, request, transport="smtpproxy")
        )
        faults.reached("smtpproxy.after_commit", env.queue_id)
        if decision.outbox and self.on_outbox is not None:
            self.on_outbox()
        plan = reinjection_plan(decision, request, lmtp=self.config.lmtp)
        replies = [r for _, r in plan.rcpt_replies] if self.config.lmtp else [plan.reply]
        if decision.is_tempfail:  # the process lives on: no poison (`deliver` forgives the attempt)
            return replies
        original: bytes | Spool = spool if streamed else request.raw
        if plan.quarantine:
            name = await loop.run_in_executor(
                self.executor, functools.partial(self.quarantine.store, original, plan.quarantine, env.queue_id,
                                                 sender=env.sender, recipients=env.recipients)
            )
            log.info("queue_id=%s quarantined as %s: %s", env.queue_id or "-", name, plan.quarantine)
        if plan.reinjects:
            assert plan.data is not None
            if streamed and plan.data is not request.raw:
                raise RuntimeError("a message kept on disk was changed without being read")
            data: bytes | Spool = spool if streamed else plan.data
            queued = await self.reinjector.send(Transaction(
                plan.sender, plan.recipients, data, xf,
                smtputf8=envelope.smtp_utf8, eightbit="BODY=8BITMIME" in envelope.mail_options,
                prefix=self.trace.field(plan.sender, plan.recipients),
            ))
            faults.reached("smtpproxy.after_reinject", env.queue_id)
            log.info("queue_id=%s reinjected to %d recipient(s): %s", env.queue_id or "-", len(plan.recipients),
                     queued)
        return replies

    async def _came_back(self, envelope: _FilterEnvelope, spool: Spool, env: Envelope) -> list[str]:
        """A message this filter reinjected came back for the same envelope (`lamsonfilter.looptrace`):
        ``451 4.4.6`` while the Postfix set-up loops; passed on unchanged once the loop guard finds it fixed."""
        count = len(env.recipients) if self.config.lmtp else 1
        loop = asyncio.get_running_loop()
        fixed = self.guard is not None and not await loop.run_in_executor(self.executor, self.guard.loops)
        if not fixed:
            log.error("queue_id=%s from=<%s> rcpts=%d mail loop: this message was reinjected by lamsonfilter "
                      "and came back for the same recipients; answered 451, Postfix keeps it, handlers not run "
                      "again. Fix the reinjection listener (-o content_filter=; lamsonfilter check)%s",
                      env.queue_id or "-", env.sender, len(env.recipients),
                      "" if self.guard is not None else "; without --postfix-config it is held until deleted")
            if self.runtime.metrics is not None:
                self.runtime.metrics.loops.inc()
            return [LOOP_REPLY] * count
        queued = await self.reinjector.send(Transaction(
            env.sender, env.recipients, spool, envelope.xforward,
            smtputf8=envelope.smtp_utf8, eightbit="BODY=8BITMIME" in envelope.mail_options))
        log.warning("queue_id=%s came back after its reinjection; the Postfix set-up no longer loops: "
                    "passed on unchanged (its handlers ran on the first pass): %s", env.queue_id or "-", queued)
        return ["250 2.0.0 Ok"] * count

    async def _quarantine_poison(self, request: MailRequest, failures: int) -> list[str]:
        """Keep a message that killed the process `failures` times in the quarantine, with its
        envelope (fsynced), then ``250`` (R15; `lamsonfilter.poison`)."""
        reason = (f"poison message: the filter process died {failures} time(s) while handling it; "
                  "handlers not run again")
        loop = asyncio.get_running_loop()
        name = await loop.run_in_executor(
            self.executor, functools.partial(self.quarantine.store, request.raw, reason, request.queue_id,
                                             sender=request.sender, recipients=request.recipients))
        log.error("queue_id=%s quarantined as %s: %s; release it with: lamsonfilter quarantine release %s",
                  request.queue_id or "-", name, reason, name)
        count = len(request.recipients) if self.config.lmtp else 1
        return ["250 2.0.0 Ok: quarantined"] * count

    def _end_attempt(self, envelope: _FilterEnvelope, final: bool) -> None:
        """The attempt ended in this process: forget the count after a final answer, else undo this
        attempt (a 451 from a live process is never held against the message: `lamsonfilter.poison`)."""
        if envelope.attempt is None:
            return
        key, n = envelope.attempt
        envelope.attempt = None
        try:
            if final:
                self.attempts.clear(key)
            else:
                self.attempts.forgive(key, n)
        except OSError as exc:
            log.warning("attempt count of %s not updated: %s", key, exc)

    @staticmethod
    def _replay_key(request: MailRequest) -> str | None:
        """What identifies this message across Postfix's retries (R13): the upstream queue id
        (XFORWARD IDENT) plus the recipients (Postfix may split one queue file into several
        deliveries), else a digest of Message-ID and envelope (Exim sends no XFORWARD)."""
        if request.queue_id:
            rcpts = hashlib.sha256("\0".join(sorted(r.lower() for r in request.recipients)).encode(
                "utf-8", "surrogateescape")).hexdigest()[:16]
            return f"ident:{request.queue_id}:{rcpts}"
        return request.content_replay_key()

    def _needs_content(self, env: Envelope) -> bool:
        """Does the application read this message?  Only routed recipients make it read the bytes."""
        try:
            return any(self.runtime.app.match(r) is not None for r in env.recipients)
        except Exception:  # noqa: BLE001 -- when in doubt, read it
            return True


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


def serve(config: ProxyConfig) -> int:
    """Run until SIGTERM/SIGINT; see `lamsonfilter.proxyserver` (kept apart to stay small)."""
    from .proxyserver import run

    return run(config)
