"""The dry run's input and report: what ``lamsonfilter test`` reads, and what it prints.

Input (`list_sources`, `read_messages`): files, directories of files,
Maildirs (``new/`` and ``cur/``), mbox files (a file that starts with a
``From `` line holds one message per ``From `` line, read with
`mailbox.mbox`), or standard input (which may be an mbox too).  Only names
are listed first; each message is read when its turn comes, so a Maildir
of 100,000 messages or a large mbox is never in memory at once.  A
directory with no messages is an error (`DryRunInputError`): a mistyped
path must not look like a clean run.

Report (`report`, `as_json`): for each message and recipient the route,
the state before and after, the outcome (a deferral says so: the dry run
never writes to the queue); the decision as milter actions
and as what the content filter would do; header changes as a diff; every
state key the handlers wrote (their own, ``ctx.set_state``, ``ctx.claim``,
the reply rate counter) and each confirmation asked or used
(``ctx.confirmations``); the rendered outbox (``--json``: each message's
headers and text); and for a handler that failed, where
(``app/handlers/x.py:42 in START``) and, at ``-v``, the traceback.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from ..app import App
from ..contentfilter.plan import reinjection_plan
from ..decisions import Action, Decision
from ..diagnostics import Trace, format_traceback
from ..mail import MailRequest
from ..milterparts.plan import milter_plan
from ..queueworker.plan import queue_plan

__all__ = [
    "DryRunInputError", "list_sources", "read_messages", "check_address", "report", "as_json", "readable",
    "routes_of", "STDIN_HINT",
]

#: Said on standard error when the dry run waits for a message typed at a terminal.
STDIN_HINT = "reading a message from standard input; end it with Ctrl-D (or give a file: lamsonfilter test FILE)"


class DryRunInputError(Exception):
    """Input the dry run cannot use at all (exit status 2, one line)."""


# ---------------------------------------------------------------- input
def list_sources(paths: tuple[Path, ...]) -> list[Path | None]:
    """The files to read, in order: files, the files of directories and Maildirs, None for stdin."""
    if not paths:
        return [None]
    out: list[Path | None] = []
    for path in paths:
        if str(path) == "-":
            out.append(None)
        elif path.is_dir():
            subdirs = [path / d for d in ("new", "cur")] if (path / "cur").is_dir() else [path]
            files = sorted(f for d in subdirs if d.is_dir() for f in d.iterdir() if f.is_file())
            if not files:
                where = "Maildir (new/ and cur/ are empty)" if (path / "cur").is_dir() else "directory"
                raise DryRunInputError(f"{path}: no messages in this {where}")
            out.extend(files)
        else:
            out.append(path)
    return out


#: An mbox separator (RFC 4155): ``From SENDER DATE`` where DATE is asctime-like, e.g.
#: ``From alice@example.com Sat Dec  5 10:00:00 2026``; it starts a message only at the start of
#: the file or after an empty line, so a stray ``From `` line in a message never splits it.
_FROM_LINE = re.compile(rb"From \S*\s+[A-Za-z]{3} [A-Za-z]{3} +\d{1,2} \d{1,2}:\d{2}(?::\d{2})?(?: \S+)? \d{4}\s*$")


def read_messages(source: Path | None) -> Iterator[tuple[str, bytes | Exception]]:
    """(name, raw bytes or the error reading it) for each message of one source.

    A source whose first line is an mbox ``From `` line is an mbox: one
    item per message, named ``FILE (message N)``, read one message at a
    time (an mbox of one message keeps the plain name).
    """
    name = "<stdin>" if source is None else str(source)
    try:
        stream = sys.stdin.buffer if source is None else source.open("rb")
    except OSError as exc:
        yield name, exc
        return
    try:
        first = stream.readline()
        if not first:  # at a terminal, another read after Ctrl-D would wait for more
            yield name, b""
            return
        if not _FROM_LINE.match(first):
            yield name, first + stream.read()
            return
        yield from _mbox_messages(name, stream)
    except OSError as exc:
        yield name, exc
    finally:
        if source is not None:
            stream.close()


def _mbox_messages(name: str, stream: Any) -> Iterator[tuple[str, bytes]]:
    """The messages of an mbox whose first ``From `` line was read already, one at a time."""
    current: list[bytes] = []
    held: bytes | None = None  # the first message, until we know whether there is a second
    done = 0
    previous_blank = False
    for line in stream:
        if previous_blank and _FROM_LINE.match(line):
            message, current, previous_blank = b"".join(current), [], False
            done += 1
            if done == 1:
                held = message
                continue
            if held is not None:
                yield f"{name} (message 1)", held
                held = None
            yield f"{name} (message {done})", message
            continue
        previous_blank = line in (b"\n", b"\r\n")
        current.append(line)
    last = b"".join(current)
    if done == 0:
        yield name, last  # an mbox of one message: the plain name
        return
    if held is not None:
        yield f"{name} (message 1)", held
    yield f"{name} (message {done + 1})", last


def check_address(value: str, option: str, allow_null: bool = False) -> str | None:
    """Why `value` is not an envelope address for `option`, or None when it is one.

    An envelope address is ``local@domain`` (angle brackets allowed);
    ``postmaster`` alone is allowed too (RFC 5321 §4.1.1.3), and ``''``
    (the null sender ``<>``) when `allow_null`.
    """
    addr = value.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if not addr:
        return None if allow_null else f"{option} '': an empty address is only the sender <>"
    if addr.lower() == "postmaster" or re.fullmatch(r"[^\s@<>()\[\],;:\"]+@(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*"
                                                     r"[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])", addr):
        return None
    return f"{option} {value!r} is not an email address (local@domain)"


# ---------------------------------------------------------------- report
def routes_of(app: App, decision: Decision) -> dict[str, str]:
    """The route of each recipient: the outcome's, else the one that matched (a failed handler's
    tempfail outcome carries none)."""
    out = {}
    for o in decision.outcomes:
        match = None if o.route else app.match(o.recipient)
        route = o.route or (str(match.route) if match is not None else "")
        if route:
            out[o.recipient] = route
    return out


def _outbox_json(raw: bytes) -> dict[str, Any]:
    from ..testing import parse

    msg = parse(raw)
    return {"headers": [[k, str(v)] for k, v in msg.items()], "text": _text_of(msg)}


def as_json(name: str, request: MailRequest, decision: Decision, routes: dict[str, str] | None = None,
            trace: Trace | None = None, commit: bool = False) -> dict[str, Any]:
    return {
        "file": name,
        "envelope": {"sender": request.sender, "recipients": list(request.recipients),
                     "queue_id": request.queue_id},
        "decision": decision.kind,
        "recipients": [
            {"recipient": o.recipient, "route": o.route or (routes or {}).get(o.recipient), "handler": o.handler,
             "state_before": o.state_before, "state_after": o.state_after,
             "action": o.action.value, "reply": o.reply if o.code else None,
             "redirect_to": list(o.redirect_to)}
            for o in decision.outcomes
        ],
        "header_changes": [
            {"op": h.op, "name": h.name, "value": h.value, "index": h.index} for h in decision.header_changes
        ],
        "body_replaced": decision.body is not None,
        "sender_changed_to": decision.sender,
        "quarantine": decision.quarantine,
        "deferred": list(decision.deferred),  # never queued by the dry run
        "state_written": [w.to_json() for w in trace.writes] if trace is not None else [],
        "committed": commit,
        "outbox": len(decision.outbox),
        "outbox_messages": [
            {"kind": m.kind, "sender": m.sender, "recipients": list(m.recipients), "size": len(m.raw),
             **_outbox_json(m.raw)}
            for m in decision.outbox
        ],
        "milter": str(milter_plan(decision, request)),
        "content_filter": str(reinjection_plan(decision, request)),
        "queue": str(queue_plan(decision, request)),
        "defects": list(request.defects),
        "notes": list(decision.notes),
        "error": decision.error,
        # a tempfail's cause: "message" (counts towards deq's POISON_LIMIT) or "storage" (does not)
        "cause": decision.cause.value if decision.is_tempfail and decision.cause is not None else None,
        "traceback": format_traceback(trace.error) if trace is not None and trace.error is not None else None,
    }


def report(index: int, name: str, request: MailRequest, decision: Decision, commit: bool,
           routes: dict[str, str] | None = None, trace: Trace | None = None, verbose: int = 0) -> str:
    out: list[str] = []
    add = out.append
    add(f"=== message {index}: {name}")
    add(f"envelope:  MAIL FROM:<{request.sender}>  RCPT TO:"
        + " ".join(f"<{r}>" for r in request.recipients))
    subject = request.header("Subject")
    if subject:
        add(f"subject:   {subject}")
    if request.defects:
        add(f"defects:   {', '.join(sorted(set(request.defects)))}"
            + ("  (ambiguous MIME)" if request.ambiguous_mime else ""))
    for o in decision.outcomes:
        add(f"recipient: {o.recipient}")
        add(f"  route:   {o.route or (routes or {}).get(o.recipient) or '(none)'}")
        if o.handler:
            add(f"  state:   {o.state_before} -> {o.state_after}" if o.state_before else "  state:   (stateless)")
        what = o.action.value
        if o.code:
            what += f" ({o.reply})"
        if o.redirect_to:
            what += " to " + ", ".join(o.redirect_to)
        if o.action is Action.DEFER:
            what += " (ctx.defer(): the daemons queue the message for lamsonfilter deq; dry run: not queued)"
        add(f"  outcome: {what}")
    cause = f"  cause: {decision.cause}" if decision.is_tempfail and decision.cause is not None else ""
    add(f"decision:  {decision.kind}{cause}" + (f"  error: {decision.error}" if decision.error else ""))
    if trace is not None and trace.error is not None:
        if verbose:
            add("traceback:")
            out.extend("  | " + line for line in format_traceback(trace.error).splitlines())
        else:
            add("           (the traceback: lamsonfilter -v test ...)")
    mp = milter_plan(decision, request)
    add(f"milter:    {mp}")
    add(f"content filter: {reinjection_plan(decision, request)}")
    add(f"queue:     {queue_plan(decision, request)}")
    for n in (*decision.notes, *mp.notes):
        add(f"note:      {n}")
    if decision.changes_message:
        before = request.header_block.decode("utf-8", "replace").splitlines()
        after_raw = decision.apply(request.raw)
        after = MailRequest(request.envelope, after_raw).header_block.decode("utf-8", "replace").splitlines()
        diff = list(difflib.unified_diff(before, after, "headers before", "headers after", lineterm="", n=0))
        add("header changes:")
        out.extend("  " + line for line in diff)
        if decision.body is not None:
            add(f"  body replaced ({len(decision.body)} bytes)")
    if decision.sender is not None:
        add(f"sender changed to: <{decision.sender}>")
    writes = list(trace.writes) if trace is not None and not decision.error else []
    keys = [w for w in writes if w.op not in _ROW_OPS]
    rows = [w for w in writes if w.op in _ROW_OPS]  # the application's models (ctx.db)
    if keys:
        add(f"state written: {len(keys)} key(s)" + ("" if commit else " (not committed: dry run)"))
        for w in keys:
            data = f"  {json.dumps(dict(w.data), sort_keys=True, default=str)}" if w.data else ""
            if w.op.startswith("confirmation "):  # ctx.confirmations: "confirmation asked: subscribe:..."
                add(f"  {w.op}: {w.key.removeprefix('confirmation:')}{data}")
                continue
            add(f"  {w.key}: {w.before or '(none)'} -> {w.after or '(none)'}{data}")
    if rows:
        add(f"rows written: {len(rows)} (ctx.db)" + ("" if commit else " (not committed: dry run)"))
        out.extend(f"  {w.op} {w.key}" for w in rows)
    if not decision.outbox:
        add("outbox:    0 message(s)")
    elif commit:
        add(f"outbox:    {len(decision.outbox)} message(s) (not stored, never sent: --commit commits the state and the rows only)")
    else:
        add(f"outbox:    {len(decision.outbox)} message(s) (not sent: dry run)")
    for i, m in enumerate(decision.outbox, 1):
        add(f"  --- {i}: {m.kind}, MAIL FROM:<{m.sender}> RCPT TO:" + " ".join(f"<{r}>" for r in m.recipients))
        out.extend("  | " + line for line in readable(m.raw).splitlines())
    return "\n".join(out) + "\n"


#: `StateWrite.op` of a row of the application's models (`lamsonfilter.store.session`).
_ROW_OPS = ("insert", "update", "delete")


def _text_of(msg: Any) -> str:
    """The text parts of a message, decoded; other parts named ``[type filename]``."""
    lines: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        if part.get_content_maintype() == "text" and not part.get_filename():
            try:
                lines.append(part.get_content().replace("\r\n", "\n").rstrip("\n"))
            except (LookupError, ValueError):
                payload = part.get_payload(decode=True)
                lines.append(payload.decode("utf-8", "replace") if isinstance(payload, bytes) else "")
        else:
            lines.append(f"[{part.get_content_type()} {part.get_filename() or ''}]")
    return "\n".join(lines)


def readable(raw: bytes) -> str:
    """An outbox message for people: headers decoded, text parts decoded, attachments named."""
    from ..testing import parse

    msg = parse(raw)
    return "\n".join([*(f"{k}: {v}" for k, v in msg.items()), "", _text_of(msg)])
