"""What the operator's commands share: ``queue``, ``outbox`` and ``quarantine``.

One family, one behaviour:

* where: ``--queue DIR`` / ``--database URL`` / ``--quarantine DIR``, or
  ``--app DIR`` for the application's own (env ``LAMSONFILTER_APP``);
  with neither, one line says which to give;
* ``list`` (oldest first, at most ``--limit``, default 100, and how many
  more), ``show`` (envelope and header; ``--raw``: the message bytes),
  each with ``--json`` (one JSON document; the actions: one JSON object per
  line and message, with ``ok`` and ``error``);
* actions take several names or ids, all checked before any is touched;
  the destructive ones (``queue remove``, ``outbox drop``, ``quarantine
  delete``) ask on a terminal and, run from a script, refuse without
  ``--yes``;
* an error is one line on stderr, ``lamsonfilter: ...``, never a
  traceback, and the exit status says what happened (`EXIT_OK`,
  `EXIT_REFUSED`, `EXIT_USAGE`).

Everything shown is made safe for a terminal (control characters from a
message's header or an envelope never reach it raw) and cut to a width.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence, TypeVar

import click

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "HEAD_MAX", "OperatorCommand", "OperatorGroup", "ago",
           "confirm", "emit_json", "emit_json_line", "fail", "fields", "header", "header_block", "json_option",
           "limit_option", "more_line", "operator_errors", "relative", "safe", "table", "utc", "where_options",
           "write_binary", "yes_option"]

#: Done (list, show and count always, when they could read).
EXIT_OK = 0
#: Not done now, nothing changed for that message: a worker holds it, or the listener
#: refused it or could not be reached; try again later.  (Or: the question was answered no.)
EXIT_REFUSED = 1
#: Bad usage: no such queue, database, quarantine, message or id; a bad name; a
#: destructive action without ``--yes`` outside a terminal; a database or directory
#: that cannot be read.  Nothing was changed.
EXIT_USAGE = 2

#: At most this many bytes of a message are read to show its header.
HEAD_MAX = 64 * 1024

_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_F = TypeVar("_F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr, ``lamsonfilter: message``, and exit with `code`."""
    text = " ".join(safe(message).split())
    click.echo(f"lamsonfilter: {text}", err=True)
    sys.exit(code)


def operator_errors(f: _F) -> _F:
    """One line and an exit status for what can go wrong: a message that is not there or a bad
    name (2), one a worker holds (1), a file or database that cannot be read (2)."""
    from ..contentfilter.quarantine import QuarantineError
    from ..mailqueue.maildir import QueueError
    from ..state import OutboxBusy, OutboxNotFound, StorageError

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except OutboxBusy as exc:
            fail(str(exc), EXIT_REFUSED)
        except (QueueError, QuarantineError, OutboxNotFound, StorageError) as exc:
            fail(str(exc))
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------- usage errors in one line
#: click's "no arguments: here is the help" (click >= 8.2) is not an error to shorten.
_HELP_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(click.exceptions, n) for n in ("NoArgsIsHelpError",) if hasattr(click.exceptions, n))


@contextmanager
def _one_line_usage(ctx: click.Context) -> Iterator[None]:
    try:
        yield
    except click.UsageError as exc:
        if isinstance(exc, _HELP_ERRORS):
            raise
        fail(f"{exc.format_message()} (see {ctx.command_path} --help)")


class OperatorCommand(click.Command):
    """A command whose usage errors (a missing argument, a bad option value) are one line too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage(ctx):
            return super().parse_args(ctx, args)


class OperatorGroup(click.Group):
    """``queue``, ``outbox``, ``quarantine``: `OperatorCommand`s; an unknown one is one line."""

    command_class = OperatorCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage(ctx):
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                            list[str]]:
        with _one_line_usage(ctx):
            return super().resolve_command(ctx, args)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------- options
def where_options(option: str, dest: str, metavar: str, envvar: str, what: str, app_help: str) -> Callable[[_F], _F]:
    """``--<option> DIR|URL`` (env `envvar`) and ``--app DIR``, both default None."""
    def decorate(f: _F) -> _F:
        f = click.option("--app", "app_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                         envvar="LAMSONFILTER_APP", metavar="DIR", help=app_help)(f)
        kind: Any = click.Path(file_okay=False, path_type=Path) if metavar == "DIR" else str
        f = click.option(f"--{option}", dest, type=kind, default=None, envvar=envvar, metavar=metavar,
                         help=f"{what} Env {envvar}.")(f)
        return f
    return decorate


def json_option(f: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="JSON instead of text, for scripts.")(f)


def limit_option(f: _F) -> _F:
    return click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
                        help="Show at most this many (and say how many more there are).")(f)


def yes_option(f: _F) -> _F:
    return click.option("--yes", "-y", "yes", is_flag=True,
                        help="Do it without asking (needed when not run from a terminal).")(f)


def confirm(yes: bool, question: str) -> None:
    """Go on when `yes`; else ask on a terminal (no: exit 1), refuse outside one (exit 2)."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question.rstrip('?')}: refused without --yes (not run from a terminal)")
    if not click.confirm(question, default=False, err=True):
        fail("nothing done", EXIT_REFUSED)


# ---------------------------------------------------------------- text
def safe(text: str | None, width: int | None = None) -> str:
    """`text` with control and direction-changing characters shown as ``?``, cut to `width`."""
    value = _UNSAFE.sub("?", text or "")
    if width is not None and len(value) > width:
        value = value[: max(1, width - 1)] + "…"
    return value


def utc(t: float | None) -> str | None:
    """A Unix time as ``2026-12-06T08:15:00Z`` (None stays None)."""
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def ago(seconds: float) -> str:
    """A duration, short: ``42s``, ``5m``, ``3h``, ``2d``."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def relative(t: float, now: float) -> str:
    """``in 5m``, ``5m ago`` or ``now``."""
    if abs(t - now) < 1:
        return "now"
    return f"in {ago(t - now)}" if t > now else f"{ago(now - t)} ago"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], widths: Sequence[int] | None = None) -> None:
    """Aligned columns, two spaces apart; cells made `safe` and cut to `widths`."""
    cut = [[safe(cell, widths[i] if widths else None) for i, cell in enumerate(row)] for row in rows]
    size = [max([len(h), *(len(r[i]) for r in cut)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cut]:
        click.echo("  ".join(c.ljust(size[i]) for i, c in enumerate(row)).rstrip())


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """``Label:  value`` lines, the values aligned; None values left out."""
    width = max(len(k) for k, _ in pairs) + 2
    for key, value in pairs:
        if value is not None:
            click.echo(f"{key + ':':<{width}}{safe(str(value))}")


def more_line(shown: int, total: int, what: str) -> str | None:
    """``100 of 350 messages shown; --limit N for more`` (None when all were shown)."""
    if total <= shown:
        return None
    return f"{shown} of {total} {what} shown; --limit N for more"


def header_block(raw: bytes) -> str:
    """A message's header (at most `HEAD_MAX` bytes), safe for a terminal."""
    end = raw.find(b"\n\n")
    crlf = raw.find(b"\r\n\r\n")
    cut = min(x for x in (end, crlf, len(raw), HEAD_MAX) if x >= 0)
    text = raw[:cut].decode("utf-8", "replace").replace("\r\n", "\n")
    return "\n".join(safe(line.replace("\t", " ")) for line in text.split("\n"))


def header(raw: bytes, name: bytes) -> str:
    """The first value of one header field (unfolded), for display only."""
    head = raw[:HEAD_MAX]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = head.find(sep)
        if end >= 0:
            head = head[:end]
    head = head.replace(b"\r\n", b"\n").replace(b"\n ", b" ").replace(b"\n\t", b" ")
    for line in head.split(b"\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            return value.strip().decode("utf-8", "replace")
    return ""


# ---------------------------------------------------------------- output
def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def emit_json_line(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def write_binary(chunks: Iterable[bytes]) -> None:
    """Bytes to stdout as they are (``--raw``)."""
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
    out.flush()
