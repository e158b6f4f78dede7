"""``lamsonfilter outbox``: the replies and list copies still waiting to go out, or given up on.

    lamsonfilter outbox list --app /srv/mailinglist [--state failed] [--limit 100] [--json]
    lamsonfilter outbox show ID [--json | --raw]
    lamsonfilter outbox retry ID...              # failed: pending again; waiting: due now
    lamsonfilter outbox drop ID... --yes

The outbox lives in the state database (``--database URL``, or the
application's ``DATABASE_URL`` with ``--app DIR``), where a message is
*pending* (the outbox worker sends it when it is due: ``next``), *failed*
(given up on: a relay refused it for good, or it kept failing for 5 days
or 200 attempts; kept until someone looks) or sent (not shown).
``retry`` makes a message pending and due now: the outbox worker of a
running daemon sends it at its next round.  It is one more attempt: if it
fails for good again, or fails for a while once it is past its lifetime,
it is failed again.  ``drop`` deletes it for good.

A message a running worker holds (its claim, on any host sharing the
database, has not ended) is never retried or dropped under it: the command
refuses it (exit status 1; try again once the worker is done with it).
The check and the change are one transaction (`lamsonfilter.store.outboxops`).
The options, output and exit status are those of every operator command
(`lamsonfilter.cli.opview`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import click

from ..state import OutboxBusy, OutboxEntry, OutboxNotFound, StateStorage
from .common import open_database
from .opview import (OperatorGroup, EXIT_REFUSED, ago, confirm, emit_json, emit_json_line, fail, fields,
                     header, header_block, json_option, limit_option, more_line, operator_errors, relative,
                     safe, table, utc, where_options, write_binary, yes_option)

__all__ = ["outbox_cmd"]

_STATES = ("pending", "failed")
#: The outbox's ids are SQL integers.
_MAX_ID = 2**31 - 1

_where = where_options("database", "database", "URL", "LAMSONFILTER_DATABASE",
                       "The state database (e.g. postgresql://db.example.org/mail).",
                       "The application directory: its DATABASE_URL.")


def _ids(texts: tuple[str, ...]) -> list[int]:
    ids = []
    for text in texts:
        if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= _MAX_ID:
            fail(f"{text!r} is not an outbox message id (a number from outbox list)")
        ids.append(int(text))
    return ids


def _summary(e: OutboxEntry, now: float) -> dict[str, Any]:
    p, m = e.item, e.item.message
    return {
        "id": p.id, "state": e.state, "kind": m.kind, "sender": m.sender, "recipients": list(m.recipients),
        "attempts": p.attempts, "created_at": utc(p.created_at), "age": int(max(0, now - p.created_at)),
        "next_attempt": (utc(p.next_attempt) or utc(now)) if e.state == "pending" else None,
        "last_error": p.last_error or None, "held": e.held(now),
        "claimed_by": e.claimed_by if e.held(now) else None,
        "claimed_until": utc(e.claimed_until) if e.held(now) else None,
        "size": len(m.raw), "subject": header(m.raw, b"subject"), "message_id": header(m.raw, b"message-id"),
    }


def _next(e: OutboxEntry, now: float) -> str:
    if e.held(now):
        return f"sending ({e.claimed_by})"
    if e.state == "failed":
        return "-"
    nxt = e.item.next_attempt
    return "now" if nxt is None or nxt <= now else relative(nxt, now)


def _recipients(rcpts: tuple[str, ...]) -> str:
    first = f"<{rcpts[0]}>" if rcpts else "(none)"
    return first + (f" +{len(rcpts) - 1}" if len(rcpts) > 1 else "")


@click.group("outbox", cls=OperatorGroup)
def outbox_cmd() -> None:
    """Look at outbox messages that wait or failed; retry or drop them.

    A message a running outbox worker holds is never changed under it.
    Exit status: 0 done; 1 not done now (a worker holds the message: try
    again later); 2 bad usage (no such database or id, no --yes).
    """


def _storage(database: str | None, app_dir: Path | None) -> StateStorage:
    return open_database(app_dir, database)


@outbox_cmd.command("list")
@_where
@click.option("--state", "states", type=click.Choice(_STATES), multiple=True,
              help="Only pending or only failed messages. Default: both.")
@limit_option
@json_option
@operator_errors
def list_cmd(database: str | None, app_dir: Path | None, states: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List pending and failed outbox messages, oldest first: id, state, attempts, next try, last error."""
    storage = _storage(database, app_dir)
    try:
        wanted = states or _STATES
        now = time.time()
        entries = storage.outbox_entries(wanted, limit=limit)
        counts = storage.outbox_counts(now)
    finally:
        storage.close()
    total = max(len(entries), sum(counts[s] for s in wanted))
    if as_json:
        emit_json({"counts": counts, "total": total, "shown": len(entries), "more": total - len(entries),
                   "messages": [_summary(e, now) for e in entries]})
        return
    if not entries:
        click.echo("the outbox has no " + (" or ".join(wanted)) + " messages")
        return
    table(["ID", "STATE", "KIND", "TRIES", "AGE", "NEXT", "RECIPIENTS", "LAST ERROR"],
          [[str(e.item.id), e.state, e.item.message.kind, str(e.item.attempts), ago(now - e.item.created_at),
            _next(e, now), _recipients(e.item.message.recipients), e.item.last_error or ""] for e in entries],
          widths=[10, 7, 7, 5, 5, 40, 50, 70])
    more = more_line(len(entries), total, "messages")
    if more:
        click.echo(more)


@outbox_cmd.command("show")
@click.argument("id_text", metavar="ID")
@_where
@json_option
@click.option("--raw", is_flag=True, help="Write the message bytes to stdout.")
@operator_errors
def show_cmd(id_text: str, database: str | None, app_dir: Path | None, as_json: bool, raw: bool) -> None:
    """Show one outbox message: state, envelope, attempts, last error, header (or --raw: all of it)."""
    [id] = _ids((id_text,))
    storage = _storage(database, app_dir)
    try:
        e = storage.outbox_entry(id)
    finally:
        storage.close()
    m, now = e.item.message, time.time()
    if raw:
        write_binary([m.raw])
        return
    s = _summary(e, now)
    if as_json:
        emit_json(s)
        return
    fields([("Id", e.item.id), ("State", e.state), ("Kind", m.kind), ("Created", s["created_at"]),
            ("Attempts", e.item.attempts), ("Next try", _next(e, now) if e.state == "pending" else None),
            ("Claimed", f"{e.claimed_by} until {s['claimed_until']}" if s["held"] else None),
            ("Last error", e.item.last_error or None), ("MAIL FROM", f"<{m.sender}>"),
            *(("RCPT TO", f"<{r}>") for r in m.recipients), ("Size", f"{len(m.raw)} bytes")])
    click.echo("")
    click.echo(header_block(m.raw))


def _act(database: str | None, app_dir: Path | None, ids: list[int], as_json: bool,
         question: Callable[[int], str] | None, yes: bool,
         action: Callable[[StateStorage, int], OutboxEntry], said: Callable[[OutboxEntry, OutboxEntry], str]) -> None:
    """Check every id, then act on each; one refused (a worker holds it, or it was sent or
    dropped since the check) makes the status 1."""
    storage = _storage(database, app_dir)
    try:
        before = {id: storage.outbox_entry(id) for id in ids}  # exit 2 for an id not there, nothing done yet
        if question is not None:
            confirm(yes, question(len(ids)))
        refused = 0
        for id in ids:
            try:
                after = action(storage, id)
            except (OutboxBusy, OutboxNotFound) as exc:  # held, or sent or dropped since the check
                refused += 1
                if as_json:
                    emit_json_line({"id": id, "ok": False, "error": str(exc)})
                else:
                    click.echo(f"lamsonfilter: {safe(str(exc))}", err=True)
                continue
            if as_json:
                emit_json_line({"id": id, "ok": True, "state": after.state, "was": before[id].state, "error": None})
            else:
                click.echo(safe(said(before[id], after)))
    finally:
        storage.close()
    if refused:
        raise SystemExit(EXIT_REFUSED)


@outbox_cmd.command("retry")
@click.argument("id_texts", metavar="ID...", nargs=-1, required=True)
@_where
@json_option
@operator_errors
def retry_cmd(id_texts: tuple[str, ...], database: str | None, app_dir: Path | None, as_json: bool) -> None:
    """Make outbox messages pending and due now: a failed one is tried again by the outbox worker.

    One held by a running worker is left alone (exit status 1).
    """
    def said(before: OutboxEntry, after: OutboxEntry) -> str:
        was = (f"was failed after {before.item.attempts} attempt(s): {before.item.last_error}"
               if before.state == "failed" else "was waiting")
        return f"{after.item.id}: pending, due now ({was})"

    _act(database, app_dir, _ids(id_texts), as_json, None, True, lambda st, id: st.retry_outbox(id), said)


@outbox_cmd.command("drop")
@click.argument("id_texts", metavar="ID...", nargs=-1, required=True)
@_where
@yes_option
@json_option
@operator_errors
def drop_cmd(id_texts: tuple[str, ...], database: str | None, app_dir: Path | None, yes: bool,
             as_json: bool) -> None:
    """Delete outbox messages for good: they are never sent (not one a running worker holds: exit status 1).

    Asks first on a terminal; from a script it needs --yes.
    """
    def said(before: OutboxEntry, after: OutboxEntry) -> str:
        return (f"{after.item.id}: dropped (was {before.state}, "
                f"{len(before.item.message.recipients)} recipient(s) will not get it)")

    _act(database, app_dir, _ids(id_texts), as_json,
         lambda n: f"Drop {n} outbox message(s) for good (never sent)?", yes,
         lambda st, id: st.drop_outbox(id), said)
