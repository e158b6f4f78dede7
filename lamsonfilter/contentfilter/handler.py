"""The content filter's transport code: one `ProxyHandler` turns an SMTP/LMTP transaction into a decision and a reply.

`lamsonfilter.contentfilter.session` (aiosmtpd's state machine) calls the
handler at MAIL, RCPT and after DATA; `ProxyHandler.deliver` builds the
`MailRequest`, asks the runtime (`Runtime.process`), carries out the
content filter's table (`lamsonfilter.contentfilter.plan`: reinject,
quarantine) and returns the reply or replies.  `ProxyConfig` is everything
``lamsonfilter smtpproxy`` starts with.  The entry module,
`lamsonfilter.smtpproxy`, explains what Postfix does with each reply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from typing import Callable

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from ..devtools import faults
from ..daemon.runtime import Runtime, replay_key
from ..daemon.steps import mail_step, rcpt_step
from ..mail import Envelope, MailRequest
from ..replies import (
    DELIVERED,
    QUARANTINED,
    RECIPIENT_OK,
    SENDER_OK,
    TOO_MANY_RECIPIENTS,
)
from .config import ProxyConfig
from .looptrace import HEAD_LIMIT, LOOP_REPLY, TraceKey
from .plan import TEMPFAIL_REPLY, reinjection_plan
from .postfix import PostfixGuard
from .quarantine import Quarantine
from .reinjector import (
    XFORWARD_ATTRS,
    ReinjectionError,
    Reinjector,
    Transaction,
)
from .session import (
    FilterEnvelope,
)
from .spool import DataLimits, Spool

__all__ = ["ProxyConfig", "ProxyHandler", "MAX_RECIPIENTS_PER_TRANSACTION"]

log = logging.getLogger("lamsonfilter.smtpproxy")

#: Recipients per transaction (Postfix sends at most $default_destination_recipient_limit, 50).
MAX_RECIPIENTS_PER_TRANSACTION = 1000
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")


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
        if on_outbox is not None:  # a worker process: the parent runs the outbox sender
            runtime.outbox_elsewhere = on_outbox
        self.quarantine = Quarantine(config.quarantine_path)
        self.attempts = runtime.count_attempts(config.attempts_path)
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
        step = mail_step(address)
        if step.refusal is not None:
            return step.refusal.line
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return SENDER_OK.line

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        """``550 5.1.1`` for an unroutable address at the app's hosts; Postfix bounces that recipient."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS_PER_TRANSACTION:
            return TOO_MANY_RECIPIENTS.line
        step = rcpt_step(self.runtime, address)
        if step.refusal is not None:
            if step.address:  # the application's refusal
                xf = envelope.xforward if isinstance(envelope, FilterEnvelope) else {}
                log.info("queue_id=%s client=%s[%s] from=<%s> rcpt=<%s> refused at RCPT: %s",
                         xf.get("IDENT", "-"), xf.get("NAME", "unknown"), xf.get("ADDR", "-"),
                         envelope.mail_from or "", step.address, step.reason)
            return step.refusal.line
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return RECIPIENT_OK.line

    async def handle_exception(self, error: Exception) -> str:
        """Anything unexpected in the SMTP machine: a temporary failure, never aiosmtpd's ``500 Error: (…)``."""
        log.error("session error, answered 451: %s: %s", type(error).__name__, error)
        return TEMPFAIL_REPLY

    # ------------------------------------------------------------------ delivery
    async def deliver(self, envelope: FilterEnvelope, spool: Spool) -> list[str]:
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

    async def _deliver(self, envelope: FilterEnvelope, spool: Spool) -> list[str]:
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
        key = replay_key(request, queue_id_is_stable=True) if routed else None
        loop = asyncio.get_running_loop()
        # counted durably *before* the handlers run: a kill -9 in them still counts (poison)
        n = await loop.run_in_executor(self.executor, self.runtime.begin_attempt, key)
        if key is not None and n:
            envelope.attempt = (key, n)
            if n > self.runtime.poison_limit:
                return await self._quarantine_poison(request, n - 1)
        decision = await loop.run_in_executor(self.executor, functools.partial(
            self.runtime.process, request, replay_key=key, deadline=envelope.deadline, transport="smtpproxy"))
        faults.reached("smtpproxy.after_commit", env.queue_id)
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

    async def _came_back(self, envelope: FilterEnvelope, spool: Spool, env: Envelope) -> list[str]:
        """A message this filter reinjected came back for the same envelope (`lamsonfilter.contentfilter.looptrace`):
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
        return [DELIVERED.line] * count

    async def _quarantine_poison(self, request: MailRequest, failures: int) -> list[str]:
        """Keep a message that killed the process `failures` times in the quarantine, with its
        envelope (fsynced), then ``250`` (poison mail: `lamsonfilter.daemon.poison`)."""
        reason = (f"poison message: the filter process died {failures} time(s) while handling it; "
                  "handlers not run again")
        loop = asyncio.get_running_loop()
        name = await loop.run_in_executor(
            self.executor, functools.partial(self.quarantine.store, request.raw, reason, request.queue_id,
                                             sender=request.sender, recipients=request.recipients))
        log.error("queue_id=%s quarantined as %s: %s; release it with: lamsonfilter quarantine release %s",
                  request.queue_id or "-", name, reason, name)
        count = len(request.recipients) if self.config.lmtp else 1
        return [QUARANTINED.line] * count

    def _end_attempt(self, envelope: FilterEnvelope, final: bool) -> None:
        """The attempt ended in this process (`Runtime.end_attempt`)."""
        if envelope.attempt is None:
            return
        key, n = envelope.attempt
        envelope.attempt = None
        self.runtime.end_attempt(key, n, final)

    def _needs_content(self, env: Envelope) -> bool:
        """Does the application read this message?  Only routed recipients make it read the bytes."""
        try:
            return any(self.runtime.app.match(r) is not None for r in env.recipients)
        except Exception:  # noqa: BLE001 -- when in doubt, read it
            return True
