"""``lamsonfilter queue``: look at the mail queue `lamsonfilter deq` works through, and act on it.

    lamsonfilter queue list  --queue /var/spool/lamsonfilter/queue [--state retry] [--limit 100] [--json]
    lamsonfilter queue count --app /srv/mailinglist                 # its QUEUE setting (var/queue)
    lamsonfilter queue show NAME [--json | --raw]
    lamsonfilter queue requeue NAME...                              # a waiting retry: now
    lamsonfilter queue remove NAME... --yes

Each message is one file (`lamsonfilter.mailqueue.maildir.MailQueue`) in
``new/`` (waiting), ``claimed/`` (a deq worker has it, until its claim
ends) or ``retry/`` (a temporary failure, until its time).  ``list`` reads
only each file's name, size and the envelope lines at its top (at most
4 KB), oldest first, and shows at most ``--limit``; ``show`` reads at most
64 KB for the header.  ``requeue`` and ``remove`` leave a message a live
worker has claimed alone (exit status 1: try again once its claim ended).
The options, output and exit status are those of every operator command
(`lamsonfilter.cli.opview`).
"""

from __future__ import annotations

import heapq
import time
from pathlib import Path
from typing import Any, Iterator

import click

from ..mailqueue.maildir import (STATES, EnvelopeMissing, MailQueue, QueueEntry, QueueError, open_regular,
                                 parse_envelope)
from .opview import (OperatorGroup, EXIT_REFUSED, HEAD_MAX, ago, confirm, emit_json, emit_json_line, fail,
                     fields, header, header_block, json_option, limit_option, more_line, operator_errors,
                     relative, safe, table, utc, where_options, write_binary, yes_option)

__all__ = ["queue_cmd"]

#: The queue of an application that has no QUEUE setting, relative to its directory.
DEFAULT_QUEUE = "var/queue"

_where = where_options("queue", "queue", "DIR", "LAMSONFILTER_QUEUE",
                       "The queue directory (deq --queue).",
                       "The application directory: its QUEUE setting (default var/queue in it).")


def _open(queue: Path | None, app_dir: Path | None) -> MailQueue:
    """The queue: --queue DIR, else the application's QUEUE (relative to its directory)."""
    if queue is None and app_dir is None:
        fail("say which queue: --queue DIR (env LAMSONFILTER_QUEUE) or --app DIR (its QUEUE setting)")
    if queue is None:
        from ..app import StartupError
        from ..settings import load_settings

        try:
            settings = load_settings(Path(str(app_dir)))
        except StartupError as exc:
            fail(str(exc))
        value = settings.get("QUEUE", DEFAULT_QUEUE)
        if not isinstance(value, (str, Path)) or not str(value):
            fail(f"{settings['APP_DIR']}/config/settings.py: QUEUE must be a directory, not {value!r}")
        queue = Path(settings["APP_DIR"]) / value
    if not (queue / "new").is_dir():
        fail(f"{queue} is not a mail queue (no new/ directory); deq creates it, or Postfix delivering into it")
    return MailQueue(queue)


def _base(name: str) -> str:
    """A message's name from what the operator gave: the name, or a file name from ``ls``."""
    return name.partition(";")[0]


def _summary(q: MailQueue, e: QueueEntry, now: float) -> dict[str, Any]:
    envelope = q.envelope(e)
    return {
        "name": e.name, "state": e.state, "attempts": e.attempts, "size": e.size,
        "stored_at": utc(e.mtime), "age": int(max(0, now - e.mtime)),
        "due": utc(e.due) if e.state == "retry" else None,
        "claimed_until": utc(e.due) if e.state == "claimed" else None,
        "owner": e.owner, "has_envelope": envelope is not None,
        "sender": envelope[0] if envelope else None, "recipient": envelope[1] if envelope else None,
    }


def _due(e: QueueEntry, now: float) -> str:
    if e.state == "retry" and e.due is not None:
        return f"retry {relative(e.due, now)}"
    if e.state == "claimed":
        ends = f", ends {relative(e.due, now)}" if e.due is not None else ""
        return f"by {e.owner or '?'}{ends}"
    return "-"


@click.group("queue", cls=OperatorGroup)
def queue_cmd() -> None:
    """Look at the mail queue deq works through; requeue or remove messages.

    States: new (waiting for a worker), claimed (a worker has it until its
    claim ends), retry (a temporary failure, waiting for its time).
    Exit status: 0 done; 1 not done now (a worker holds the message: try
    again later); 2 bad usage (no such queue or message, bad name, no --yes).
    """


@queue_cmd.command("list")
@_where
@click.option("--state", "states", type=click.Choice(STATES), multiple=True,
              help="Only messages in this state (repeat for several). Default: all.")
@limit_option
@json_option
@operator_errors
def list_cmd(queue: Path | None, app_dir: Path | None, states: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List the queued messages, oldest first: name, state, attempts, size, age, due or owner, envelope."""
    q = _open(queue, app_dir)
    now = time.time()
    total = 0

    def counted() -> Iterator[QueueEntry]:
        nonlocal total
        for e in q.entries(states or STATES):
            total += 1
            yield e

    oldest = heapq.nsmallest(limit, counted(), key=lambda e: (e.mtime, e.name))  # memory: `limit` entries
    shown = [(e, _summary(q, e, now)) for e in oldest]
    if as_json:
        emit_json({"queue": str(q.path), "total": total, "shown": len(shown), "more": total - len(shown),
                   "messages": [s for _, s in shown]})
        return
    if not shown:
        click.echo(f"the queue {q.path} is empty" + (f" ({', '.join(states)})" if states else ""))
        return
    table(["NAME", "STATE", "TRIES", "SIZE", "AGE", "DUE/OWNER", "SENDER", "RECIPIENT"],
          [[e.name, e.state, str(e.attempts), str(e.size), ago(now - e.mtime), _due(e, now),
            "(no envelope)" if not s["has_envelope"] else f"<{s['sender']}>", s["recipient"] or ""]
           for e, s in shown], widths=[60, 7, 5, 10, 5, 40, 40, 40])
    more = more_line(len(shown), total, "messages")
    if more:
        click.echo(more)


@queue_cmd.command("count")
@_where
@json_option
@operator_errors
def count_cmd(queue: Path | None, app_dir: Path | None, as_json: bool) -> None:
    """How many messages are new, claimed and waiting for a retry (only names are read)."""
    q = _open(queue, app_dir)
    counts = q.count()
    counts["total"] = sum(counts.values())
    if as_json:
        emit_json({"queue": str(q.path), **counts})
        return
    click.echo("  ".join(f"{k} {v}" for k, v in counts.items()))


@queue_cmd.command("show")
@click.argument("name")
@_where
@json_option
@click.option("--raw", is_flag=True, help="Write the message bytes (without the envelope lines) to stdout.")
@operator_errors
def show_cmd(name: str, queue: Path | None, app_dir: Path | None, as_json: bool, raw: bool) -> None:
    """Show one queued message: state, envelope and its header (or --raw: the whole message)."""
    q = _open(queue, app_dir)
    e = q.find(_base(name))
    with open_regular(e.path) as f:
        head = f.read(HEAD_MAX + 4096)
        try:
            sender, recipient, start = parse_envelope(e.name, e.path, head)
            envelope: tuple[str, str] | None = (sender, recipient)
        except EnvelopeMissing:
            envelope, start = None, 0
        if raw:
            f.seek(start)
            write_binary(iter(lambda: f.read(65536), b""))
            return
    now = time.time()
    s = _summary(q, e, now)
    body = head[start:]
    s["subject"] = header(body, b"subject")
    s["message_id"] = header(body, b"message-id")
    s["path"] = str(e.path)
    if as_json:
        emit_json(s)
        return
    fields([("Name", e.name), ("State", e.state), ("Path", e.path), ("Stored", s["stored_at"]),
            ("Attempts", e.attempts), ("Due/owner", _due(e, now) if e.state != "new" else None),
            ("MAIL FROM", f"<{envelope[0]}>" if envelope else "no envelope at the top: deq moves it aside"),
            ("RCPT TO", f"<{envelope[1]}>" if envelope else None), ("Size", f"{e.size} bytes")])
    click.echo("")
    click.echo(header_block(body))


def _checked(q: MailQueue, names: tuple[str, ...]) -> list[str]:
    """Every name, checked before any is touched (exit 2 naming the first one not there)."""
    return [q.find(_base(n)).name for n in names]


def _act(verb: str, names: list[str], action: Any, as_json: bool) -> None:
    refused = 0
    for name in names:
        try:
            e: QueueEntry = action(name)
        except QueueError as exc:
            refused += 1
            if as_json:
                emit_json_line({"name": name, "ok": False, "error": str(exc)})
            else:
                click.echo(f"lamsonfilter: {safe(str(exc))}", err=True)
            continue
        if as_json:
            emit_json_line({"name": name, "ok": True, "state": e.state, "error": None})
        else:
            click.echo(f"{name}: {verb}" + (f" (new, {e.attempts} attempt(s) so far)" if verb == "requeued" else ""))
    if refused:
        raise SystemExit(EXIT_REFUSED)


@queue_cmd.command("requeue")
@click.argument("names", nargs=-1, required=True)
@_where
@json_option
@operator_errors
def requeue_cmd(names: tuple[str, ...], queue: Path | None, app_dir: Path | None, as_json: bool) -> None:
    """Put messages back into new/ now: a retry before its time, or a claim whose worker died.

    A message a live worker has claimed is left alone (exit status 1).
    """
    q = _open(queue, app_dir)
    _act("requeued", _checked(q, names), q.requeue, as_json)


@queue_cmd.command("remove")
@click.argument("names", nargs=-1, required=True)
@_where
@yes_option
@json_option
@operator_errors
def remove_cmd(names: tuple[str, ...], queue: Path | None, app_dir: Path | None, yes: bool, as_json: bool) -> None:
    """Delete queued messages for good (not one a live worker has claimed: exit status 1).

    Asks first on a terminal; from a script it needs --yes.
    """
    q = _open(queue, app_dir)
    checked = _checked(q, names)
    confirm(yes, f"Remove {len(checked)} message(s) from the queue {q.path} for good?")
    _act("removed", checked, q.remove, as_json)

