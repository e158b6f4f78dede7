"""``lamsonfilter quarantine``: look at, release or delete what was kept aside.

The content filter keeps a message in its quarantine (`lamsonfilter.contentfilter.quarantine`,
a Maildir) when a handler asked for it, when a recipient was rejected after
queueing, or when the message killed the filter process ``POISON_LIMIT``
times (`lamsonfilter.daemon.poison`); ``deq`` keeps there what it cannot
run.  Each file keeps the envelope (MAIL FROM and every RCPT TO, Bcc
included), so a message can be sent on later as if the filter had accepted it:

    lamsonfilter quarantine list --quarantine /var/lib/lamsonfilter/quarantine [--limit 100] [--json]
    lamsonfilter quarantine show NAME            # envelope, reason, headers
    lamsonfilter quarantine show NAME --raw      # the original bytes
    lamsonfilter quarantine release NAME...      # to the reinjection listener, then removed
    lamsonfilter quarantine delete NAME... --yes

``release`` sends the original bytes with the saved envelope to the
reinjection listener (``--reinject``, 127.0.0.1:10026 by default: Postfix's
smtpd that does not filter again), so the handlers do not run again; the
file is removed only after the listener accepted every recipient.

The options, output and exit status are those of every operator command
(`lamsonfilter.cli.opview`): 0 done; 1 a release the listener refused or
could not take (the message stays in the quarantine; try again); 2 bad
usage: no such quarantine or message, a message stored without an
envelope, a delete without ``--yes`` outside a terminal.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click

from ..contentfilter.quarantine import Quarantine, QuarantinedMessage, QuarantineError
from .opview import (OperatorGroup, EXIT_REFUSED, HEAD_MAX, ago, confirm, emit_json, emit_json_line, fail,
                     fields, header, header_block, json_option, limit_option, more_line, operator_errors, safe,
                     table, utc, where_options, write_binary, yes_option)

__all__ = ["quarantine_cmd"]

_where = where_options("quarantine", "quarantine", "DIR", "LAMSONFILTER_QUARANTINE",
                       "The quarantine Maildir (smtpproxy --quarantine).",
                       "The application directory: its var/quarantine (smtpproxy's default).")


def _open(quarantine: Path | None, app_dir: Path | None) -> Quarantine:
    """The quarantine: --quarantine DIR, else APP/var/quarantine (the smtpproxy default)."""
    if quarantine is None and app_dir is None:
        fail("say which quarantine: --quarantine DIR (env LAMSONFILTER_QUARANTINE) or --app DIR")
    path = quarantine if quarantine is not None else Path(str(app_dir)).resolve() / "var" / "quarantine"
    if not (path / "new").is_dir():
        fail(f"{path} is not a quarantine (no new/ directory); the content filter creates it")
    return Quarantine(path)


def _summary(m: QuarantinedMessage, now: float) -> dict[str, Any]:
    return {
        "name": m.name,
        "stored_at": utc(m.stored_at),
        "age": int(max(0, now - m.stored_at)),
        "queue_id": m.queue_id,
        "has_envelope": m.has_envelope,
        "sender": m.sender,
        "recipients": list(m.recipients),
        "reason": m.reason,
        "size": m.size,
        "subject": header(m.raw, b"subject"),
        "message_id": header(m.raw, b"message-id"),
    }


def _sender(m: QuarantinedMessage) -> str:
    return f"<{m.sender}>" if m.has_envelope else "(no envelope: cannot be released)"


@click.group("quarantine", cls=OperatorGroup)
def quarantine_cmd() -> None:
    """Look at, release or delete quarantined messages.

    Each quarantined message keeps its envelope (sender and every recipient,
    Bcc included).  Exit status: 0 done; 1 release refused or failed (message
    kept: try again later); 2 bad usage (no such quarantine or message, no --yes).
    """


@quarantine_cmd.command("list")
@_where
@limit_option
@json_option
@operator_errors
def list_cmd(quarantine: Path | None, app_dir: Path | None, limit: int, as_json: bool) -> None:
    """List the quarantined messages, oldest first: name, age, queue id, envelope, size, reason."""
    q = _open(quarantine, app_dir)
    names = q.names()
    messages = []
    for name in names[:limit]:
        try:
            messages.append(q.load(name, max_bytes=HEAD_MAX))
        except QuarantineError:
            continue  # deleted meanwhile
    now = time.time()
    if as_json:
        emit_json({"quarantine": str(q.path), "total": len(names), "shown": len(messages),
                   "more": max(0, len(names) - limit), "messages": [_summary(m, now) for m in messages]})
        return
    if not messages:
        click.echo(f"the quarantine {q.path} is empty")
        return
    table(["NAME", "AGE", "QUEUE ID", "SENDER", "RCPTS", "SIZE", "REASON"],
          [[m.name, ago(now - m.stored_at), m.queue_id, _sender(m), str(len(m.recipients)), str(m.size), m.reason]
           for m in messages], widths=[60, 5, 16, 40, 5, 10, 80])
    more = more_line(min(limit, len(names)), len(names), "messages")
    if more:
        click.echo(more)


@quarantine_cmd.command("show")
@click.argument("name")
@_where
@json_option
@click.option("--raw", is_flag=True, help="Write the original message bytes (as received) to stdout.")
@operator_errors
def show_cmd(name: str, quarantine: Path | None, app_dir: Path | None, as_json: bool, raw: bool) -> None:
    """Show one quarantined message: envelope, reason, and its header (or --raw: the whole message)."""
    q = _open(quarantine, app_dir)
    m = q.load(name, max_bytes=None if raw else HEAD_MAX)
    if raw:
        write_binary([m.raw])
        return
    s = _summary(m, time.time())
    if as_json:
        emit_json(s)
        return
    fields([("Name", m.name), ("Stored", s["stored_at"]), ("Queue id", m.queue_id), ("Reason", m.reason),
            ("MAIL FROM", _sender(m)), *(("RCPT TO", f"<{r}>") for r in m.recipients),
            ("Size", f"{m.size} bytes")])
    click.echo("")
    click.echo(header_block(m.raw))


@quarantine_cmd.command("release")
@click.argument("names", nargs=-1, required=True)
@_where
@click.option("--reinject", default="127.0.0.1:10026", show_default=True, metavar="HOST:PORT",
              envvar="LAMSONFILTER_REINJECT",
              help="The reinjection listener (no content filter there). Env LAMSONFILTER_REINJECT.")
@json_option
@operator_errors
def release_cmd(names: tuple[str, ...], quarantine: Path | None, app_dir: Path | None, reinject: str,
                as_json: bool) -> None:
    """Send quarantined messages on with their saved envelope, as if the filter had accepted them.

    The original bytes go to the reinjection listener (the handlers do not
    run again); a message is removed from the quarantine only after the
    listener accepted every recipient.
    """
    from ..contentfilter.reinjector import ReinjectionError, Reinjector, Transaction
    from ..settings import parse_hostport

    try:
        host, port = parse_hostport(reinject)
    except ValueError as exc:
        fail(f"--reinject {exc}")
    q = _open(quarantine, app_dir)
    messages = [q.load(name) for name in names]
    for m in messages:
        if not m.has_envelope:
            fail(f"{m.name} was stored without its envelope: it cannot be released "
                         f"(lamsonfilter quarantine show {m.name} --raw gives the message)")

    async def send_all() -> list[tuple[QuarantinedMessage, str | None, str]]:
        reinjector = Reinjector(host, port, helo="lamsonfilter.localhost", connect_timeout=30.0)
        done: list[tuple[QuarantinedMessage, str | None, str]] = []
        try:
            for m in messages:
                assert m.sender is not None
                try:
                    reply = await asyncio.wait_for(
                        reinjector.send(Transaction(m.sender, m.recipients, m.raw,
                                                    smtputf8=not (m.sender.isascii()
                                                                  and all(r.isascii() for r in m.recipients)),
                                                    eightbit=not m.raw.isascii())), 300)
                    done.append((m, reply, ""))
                except (ReinjectionError, asyncio.TimeoutError) as exc:
                    done.append((m, None, str(exc) or "timed out"))
        finally:
            await reinjector.close()
        return done

    failed = 0
    for m, reply, error in asyncio.run(send_all()):
        if reply is not None:
            try:
                q.remove(m.name)
            except (QuarantineError, OSError) as exc:
                error = f"released ({reply}) but not removed from the quarantine: {exc}"
        if reply is None or error:
            failed += 1
        if as_json:
            emit_json_line({"name": m.name, "ok": reply is not None, "reply": reply, "error": error or None})
        elif reply is None:
            click.echo(f"lamsonfilter: {m.name}: not released, kept in the quarantine: {safe(error)}", err=True)
        else:
            click.echo(safe(f"{m.name}: released to {len(m.recipients)} recipient(s) via {host}:{port}: {reply}"
                            + (f" ({error})" if error else "")))
    if failed:
        raise SystemExit(EXIT_REFUSED)


@quarantine_cmd.command("delete")
@click.argument("names", nargs=-1, required=True)
@_where
@yes_option
@json_option
@operator_errors
def delete_cmd(names: tuple[str, ...], quarantine: Path | None, app_dir: Path | None, yes: bool,
               as_json: bool) -> None:
    """Delete quarantined messages for good (all names are checked first).

    Asks first on a terminal; from a script it needs --yes.
    """
    q = _open(quarantine, app_dir)
    for name in names:
        q.load(name, max_bytes=0)
    confirm(yes, f"Delete {len(names)} message(s) from the quarantine {q.path} for good?")
    for name in names:
        q.remove(name)
        if as_json:
            emit_json_line({"name": name, "ok": True, "error": None})
        else:
            click.echo(f"{name}: deleted")
