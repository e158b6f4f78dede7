"""``lamsonfilter quarantine``: look at, release or delete what the content filter kept aside.

The content filter keeps a message in its quarantine (`lamsonfilter.contentfilter.quarantine`,
a Maildir) when a handler asked for it, when a recipient was rejected after
queueing, or when the message killed the filter process ``POISON_LIMIT``
times (`lamsonfilter.daemon.poison`).  Each file keeps the envelope (MAIL FROM and
every RCPT TO, Bcc included), so a message can be sent on later as if the
filter had accepted it:

    lamsonfilter quarantine list --quarantine /var/lib/lamsonfilter/quarantine
    lamsonfilter quarantine show NAME            # envelope, reason, headers
    lamsonfilter quarantine show NAME --raw      # the original bytes
    lamsonfilter quarantine release NAME         # to the reinjection listener, then removed
    lamsonfilter quarantine delete NAME

``release`` sends the original bytes with the saved envelope to the
reinjection listener (``--reinject``, 127.0.0.1:10026 by default: Postfix's
smtpd that does not filter again), so the handlers do not run again; the
file is removed only after the listener accepted every recipient.

Exit status: 0 done; 1 a release the listener refused or could not take
(the message stays in the quarantine; try again); 2 bad usage: no such
quarantine or message, a message stored without an envelope.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..contentfilter.quarantine import Quarantine, QuarantinedMessage, QuarantineError

__all__ = ["quarantine_cmd"]


def _usage_error(message: str) -> None:
    click.echo(f"lamsonfilter: {message}", err=True)
    sys.exit(2)


def _open(quarantine: Path | None, app_dir: Path | None) -> Quarantine:
    """The quarantine: --quarantine DIR, else APP/var/quarantine (the smtpproxy default)."""
    if quarantine is None and app_dir is None:
        _usage_error("say which quarantine: --quarantine DIR (env LAMSONFILTER_QUARANTINE) or --app DIR")
    path = quarantine if quarantine is not None else Path(str(app_dir)).resolve() / "var" / "quarantine"
    if not (path / "new").is_dir():
        _usage_error(f"{path} is not a quarantine (no new/ directory); the content filter creates it")
    return Quarantine(path)


def _load(q: Quarantine, name: str) -> QuarantinedMessage:
    try:
        return q.load(name)
    except QuarantineError as exc:
        _usage_error(str(exc))
        raise  # not reached


def _summary(m: QuarantinedMessage) -> dict[str, Any]:
    return {
        "name": m.name,
        "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.stored_at)),
        "queue_id": m.queue_id,
        "sender": m.sender,
        "recipients": list(m.recipients),
        "reason": m.reason,
        "size": len(m.raw),
        "subject": _header(m.raw, b"subject"),
    }


def _header(raw: bytes, name: bytes) -> str:
    """The first value of one header field (unfolded), for display only."""
    end = raw.find(b"\r\n\r\n")
    head = raw[: end if end >= 0 else 65536].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in head.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            return value.strip().decode("utf-8", "replace")
    return ""


_where = [
    click.option("--quarantine", "quarantine", type=click.Path(file_okay=False, path_type=Path), default=None,
                 envvar="LAMSONFILTER_QUARANTINE", metavar="DIR",
                 help="The quarantine Maildir (smtpproxy --quarantine). Env LAMSONFILTER_QUARANTINE."),
    click.option("--app", "app_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 envvar="LAMSONFILTER_APP", metavar="DIR",
                 help="The application directory: its var/quarantine (smtpproxy's default)."),
]


def _where_options(f: Any) -> Any:
    for option in reversed(_where):
        f = option(f)
    return f


@click.group("quarantine")
def quarantine_cmd() -> None:
    """Look at, release or delete messages the content filter quarantined.

    Each quarantined message keeps its envelope (sender and every recipient,
    Bcc included).  Exit status: 0 done, 1 release failed (message kept),
    2 bad usage (no such quarantine or message).
    """


@quarantine_cmd.command("list")
@_where_options
@click.option("--json", "as_json", is_flag=True, help="One JSON array of the messages instead of a table.")
def list_cmd(quarantine: Path | None, app_dir: Path | None, as_json: bool) -> None:
    """List the quarantined messages, oldest first: name, time, queue id, envelope, reason."""
    q = _open(quarantine, app_dir)
    messages = []
    for name in q.names():
        try:
            messages.append(q.load(name))
        except QuarantineError:
            continue  # deleted meanwhile
    if as_json:
        click.echo(json.dumps([_summary(m) for m in messages], indent=2))
        return
    if not messages:
        click.echo(f"the quarantine {q.path} is empty")
        return
    for m in messages:
        s = _summary(m)
        envelope = (f"from=<{m.sender}> rcpts={len(m.recipients)}" if m.has_envelope
                    else "no envelope kept (cannot be released)")
        click.echo(f"{m.name}  {s['stored_at']}  queue_id={m.queue_id}  {envelope}  {m.reason}")


@quarantine_cmd.command("show")
@click.argument("name")
@_where_options
@click.option("--json", "as_json", is_flag=True, help="The envelope and reason as JSON.")
@click.option("--raw", is_flag=True, help="Write the original message bytes (as received) to stdout.")
def show_cmd(name: str, quarantine: Path | None, app_dir: Path | None, as_json: bool, raw: bool) -> None:
    """Show one quarantined message: envelope, reason, and its header (or --raw: the whole message)."""
    m = _load(_open(quarantine, app_dir), name)
    if raw:
        sys.stdout.buffer.write(m.raw)
        sys.stdout.buffer.flush()
        return
    if as_json:
        click.echo(json.dumps(_summary(m), indent=2))
        return
    s = _summary(m)
    click.echo(f"Name:       {m.name}")
    click.echo(f"Stored:     {s['stored_at']}")
    click.echo(f"Queue id:   {m.queue_id}")
    click.echo(f"Reason:     {m.reason}")
    if m.has_envelope:
        click.echo(f"MAIL FROM:  <{m.sender}>")
        for r in m.recipients:
            click.echo(f"RCPT TO:    <{r}>")
    else:
        click.echo("Envelope:   not kept (stored by an older lamsonfilter): cannot be released")
    click.echo(f"Size:       {len(m.raw)} bytes")
    end = m.raw.find(b"\r\n\r\n")
    click.echo("")
    click.echo(m.raw[: end if end >= 0 else 8192].decode("utf-8", "replace"))


@quarantine_cmd.command("release")
@click.argument("names", nargs=-1, required=True)
@_where_options
@click.option("--reinject", default="127.0.0.1:10026", show_default=True, metavar="HOST:PORT",
              envvar="LAMSONFILTER_REINJECT",
              help="The reinjection listener (no content filter there). Env LAMSONFILTER_REINJECT.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message: name, ok, reply.")
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
        _usage_error(f"--reinject {exc}")
        return
    q = _open(quarantine, app_dir)
    messages = [_load(q, name) for name in names]
    for m in messages:
        if not m.has_envelope:
            _usage_error(f"{m.name} was stored without its envelope: it cannot be released "
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
            click.echo(json.dumps({"name": m.name, "ok": reply is not None, "reply": reply, "error": error or None}))
        elif reply is None:
            click.echo(f"lamsonfilter: {m.name}: not released, kept in the quarantine: {error}", err=True)
        else:
            click.echo(f"{m.name}: released to {len(m.recipients)} recipient(s) via {host}:{port}: {reply}"
                       + (f" ({error})" if error else ""))
    sys.exit(1 if failed else 0)


@quarantine_cmd.command("delete")
@click.argument("names", nargs=-1, required=True)
@_where_options
def delete_cmd(names: tuple[str, ...], quarantine: Path | None, app_dir: Path | None) -> None:
    """Delete quarantined messages for good (all names are checked first)."""
    q = _open(quarantine, app_dir)
    for name in names:
        _load(q, name)
    for name in names:
        try:
            q.remove(name)
        except (QuarantineError, OSError) as exc:
            _usage_error(f"{name}: {exc}")
        click.echo(f"{name}: deleted")
