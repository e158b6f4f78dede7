"""Sending the outbox: the committed replies and new messages go to the MTA's reinjection port.

Handlers never send mail.  `App.process` commits the outbox together with
the state change; the transports then wake an `OutboxWorker`, which reads
the committed messages from the state store, hands each to the `Relay`
(Postfix's reinjection listener, which does not filter again, so generated
mail is never handled twice) and marks it sent.  A message that could not
be handed over stays pending and is tried again later, also after a restart
(the outbox is in the database, not in memory).

    relay = Relay("127.0.0.1", 10026)
    worker = OutboxWorker(app.storage, relay)
    worker.start()           # a background thread
    ...
    worker.wake()            # after each processed message
    worker.stop()

Errors: a 4xx, a refused connection or a timeout leaves the message pending
(logged once per attempt); a permanent 5xx for every recipient marks it
sent and logs the refusal, so a bad message cannot block the queue.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import threading
import time
from typing import Callable, Sequence

from .decisions import OutboxMessage
from .state import StateStorage

__all__ = ["Relay", "RelayError", "PermanentRelayError", "OutboxWorker"]

log = logging.getLogger("lamsonfilter.relay")


class RelayError(Exception):
    """The relay did not take the message; try again later."""


class PermanentRelayError(RelayError):
    """The relay refused the message for good (5xx for every recipient)."""


class Relay:
    """An SMTP client for the reinjection listener (loopback by default)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 10026, timeout: float = 60.0,
                 helo: str | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.helo = helo or "lamsonfilter.localhost"

    def __repr__(self) -> str:
        return f"Relay({self.host}:{self.port})"

    def send(self, message: OutboxMessage) -> None:
        """Hand one message over; raise `RelayError` unless every recipient was accepted."""
        options: list[str] = ["BODY=8BITMIME"] if _has_8bit(message.raw) else []
        if not (message.sender.isascii() and all(r.isascii() for r in message.recipients)):
            options.append("SMTPUTF8")
        try:
            with smtplib.SMTP(self.host, self.port, local_hostname=self.helo, timeout=self.timeout) as smtp:
                smtp.ehlo()
                mail_options = [o for o in options if smtp.has_extn(o.split("=")[0].lower())]
                refused = smtp.sendmail(message.sender, list(message.recipients), message.raw, mail_options)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if all(500 <= c < 600 for c in codes):
                raise PermanentRelayError(f"every recipient refused: {exc.recipients}") from exc
            raise RelayError(f"recipients refused: {exc.recipients}") from exc
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise PermanentRelayError(f"{exc.smtp_code} {exc.smtp_error!r}") from exc
            raise RelayError(f"{exc.smtp_code} {exc.smtp_error!r}") from exc
        except (smtplib.SMTPException, OSError, socket.timeout) as exc:
            raise RelayError(f"{self.host}:{self.port}: {exc}") from exc
        if refused:
            # some recipients refused: smtplib does not raise; the message is only partly out
            raise RelayError(f"recipients refused: {refused}")


def _has_8bit(raw: bytes) -> bool:
    return any(b > 127 for b in raw)


class OutboxWorker:
    """Sends committed outbox messages in a background thread."""

    def __init__(self, storage: StateStorage, relay: Relay, interval: float = 30.0, batch: int = 100,
                 housekeeping: Callable[[], object] | None = None, housekeeping_interval: float = 3600.0) -> None:
        self.storage = storage
        self.housekeeping = housekeeping
        self.housekeeping_interval = housekeeping_interval
        self._last_housekeeping = 0.0
        self.relay = relay
        self.interval = interval
        self.batch = batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()

    def flush(self) -> int:
        """Send what is pending now; returns how many were handed over (or refused for good)."""
        with self._flush_lock:
            done = 0
            while True:
                try:
                    pending = self.storage.pending_outbox(self.batch)
                except Exception as exc:  # noqa: BLE001 -- the store may be down; try later
                    log.error("outbox: cannot read pending messages: %s", exc)
                    return done
                if not pending:
                    return done
                sent: list[int] = []
                failed = False
                for item in pending:
                    try:
                        self.relay.send(item.message)
                    except PermanentRelayError as exc:
                        log.error("outbox: message %d refused for good, dropped: %s", item.id, exc)
                    except RelayError as exc:
                        log.warning("outbox: message %d not sent, will retry: %s", item.id, exc)
                        failed = True
                        break
                    sent.append(item.id)
                self._mark(sent)
                done += len(sent)
                if failed or len(pending) < self.batch:
                    return done

    def _housekeep(self) -> None:
        now = time.monotonic()
        if self.housekeeping is None or now - self._last_housekeeping < self.housekeeping_interval:
            return
        self._last_housekeeping = now
        try:
            self.housekeeping()
        except Exception as exc:  # noqa: BLE001 -- housekeeping must not stop the outbox
            log.error("housekeeping failed: %s", exc)

    def _mark(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        try:
            self.storage.mark_sent(ids)
        except Exception as exc:  # noqa: BLE001 -- sent twice later is better than lost
            log.error("outbox: sent %s but could not mark them sent (they may go out twice): %s", list(ids), exc)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lamsonfilter-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()
            self._housekeep()
        self.flush()  # last chance before exit: nothing is lost either way, it is in the store
