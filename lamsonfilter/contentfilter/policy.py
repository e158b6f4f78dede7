"""Refusing unknown application addresses *before* Postfix queues: a policy delegation server.

In content-filter mode Postfix accepts and queues first; a ``550 5.1.1``
from the filter at RCPT then makes Postfix bounce to the envelope sender.
To refuse the address while the client is still connected, Postfix asks
this server (SMTPD_POLICY_README, "Postfix SMTP Access Policy Delegation")
at RCPT time, and lamsonfilter answers with the application's own
`App.check_recipient`, the same check the milter does in ``envrcpt``:

    # main.cf (port 25 smtpd; the 10026 listener overrides its restrictions)
    smtpd_recipient_restrictions = check_policy_service { inet:127.0.0.1:10027,
        default_action=DUNNO }, permit_mynetworks, reject_unauth_destination

    lamsonfilter smtpproxy --policy 127.0.0.1:10027 ...

Protocol: Postfix sends ``name=value`` lines ending with an empty line and
reads ``action=...`` and an empty line back; one connection carries many
requests.  The answer is ``550 5.1.1 ...`` for an address at an
application host that no route takes, ``501 5.1.3 ...`` for an address
the filter itself would refuse (over-long, control characters: it would
be a bounce after queueing), ``DUNNO`` (no opinion: the other restrictions decide) for everything
else, including errors.  Requests are
bounded (line length, attribute count); a malformed one closes the
connection, and Postfix's ``default_action`` applies.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from ..daemon.runtime import Runtime
from ..daemon.steps import rcpt_step

__all__ = ["PolicyServer", "policy_answer"]

log = logging.getLogger("lamsonfilter.contentfilter.policy")

_MAX_LINE = 8192
_MAX_ATTRIBUTES = 200


def policy_answer(runtime: Runtime, attributes: dict[str, str]) -> str:
    """The ``action=`` value for one request (see the module docstring)."""
    if attributes.get("request") != "smtpd_access_policy":
        return "DUNNO"
    if attributes.get("protocol_state", "RCPT").upper() != "RCPT":
        return "DUNNO"
    # a bad address: the filter would answer 501 at RCPT after queueing, and Postfix
    # would bounce it; refuse it now, while the client is still connected
    step = rcpt_step(runtime, attributes.get("recipient", ""))
    if step.refusal is not None:
        return _refused(attributes, step.refusal.line)
    return "DUNNO"


def _refused(attributes: dict[str, str], reply: str) -> str:
    """Log a refusal (Postfix logs it too, as ``NOQUEUE: reject``), then return it."""
    log.info("queue_id=%s client=%s[%s] from=<%s> rcpt=<%s> refused at RCPT (policy): %s",
             attributes.get("queue_id") or "-", attributes.get("client_name") or "unknown",
             attributes.get("client_address") or "-", attributes.get("sender", ""),
             attributes.get("recipient", "")[:300], reply)
    return reply


class PolicyServer:
    """The policy listener, on the same asyncio loop as the content filter."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                attributes: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if not line.endswith(b"\n"):
                        return  # EOF, or a line longer than the limit
                    text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
                    if not text:
                        break
                    name, eq, value = text.partition("=")
                    if not eq or len(attributes) >= _MAX_ATTRIBUTES:
                        log.warning("malformed policy request, closing the connection")
                        return
                    attributes[name] = value
                action = policy_answer(self.runtime, attributes)
                writer.write(f"action={action}\n\n".encode("utf-8", "surrogateescape"))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            writer.close()

    async def start(self, sock: socket.socket) -> asyncio.AbstractServer:
        return await asyncio.start_server(self.handle, sock=sock, limit=_MAX_LINE)
