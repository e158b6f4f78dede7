"""What one run of the application did besides its `Decision`, and where a handler failed.

Two questions an application author asks when a message does not do what
they meant, answered here for the log, the dry run and the tests:

*Where did my handler fail?*  `failure_location` names the innermost frame
of the traceback that is the application's own code (not lamsonfilter, not
the standard library, not an installed package), relative to the
application directory::

    >>> failure_location(exc, app_dir="/srv/helpdesk")        # doctest: +SKIP
    "app/handlers/tickets.py:42 in START"

`describe_failure` makes the one line the daemons log (``KeyError: 'count'
at app/handlers/tickets.py:42 in START``) and `format_traceback` the full
traceback they add at ``-v`` (DEBUG).

*Which keys did it write?*  Pass a `Trace` to ``App.process(request,
trace=trace)``: it collects every state key the run wrote (the handler's
own key, ``ctx.set_state`` on other keys, ``ctx.claim`` tokens, the reply
rate limit's counter), each with its state before and after, and the
exception that became a tempfail.  Tracing reads each key once more before
its first write, so it is for dry runs and tests, not the hot path.
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Trace", "StateWrite", "failure_location", "describe_failure", "format_traceback"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) + os.sep
    for p in {sysconfig.get_path(n) for n in ("stdlib", "platstdlib", "purelib", "platlib")}
    if p
)


@dataclass(frozen=True)
class StateWrite:
    """One write of one run: `key` went from `before` to `after` (None: no record).

    `op` is ``set``, ``clear`` or ``claim`` (a one-time token recorded);
    `data` is the data stored with `after`.  A row of the application's
    models (``ctx.db``) is ``table:primary key`` with `op` ``insert``,
    ``update`` or ``delete`` (`lamsonfilter.store.session`).
    """

    key: str
    op: str
    before: str | None
    after: str | None
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "op": self.op, "state_before": self.before, "state_after": self.after,
                "data": dict(self.data)}


@dataclass
class Trace:
    """Filled in by ``App.process(request, trace=...)``: the writes of the run, and its failure.

    `writes` keeps the last write of each key, in the order the keys were
    first written; `error` is the exception that became a tempfail (with
    its ``__traceback__``), None when nothing failed.  A row of the
    application's models that the run inserted stays an ``insert`` when a
    later flush updates it (a ticket numbered after its id is known), and
    is forgotten when the run deletes it again: the net change is listed.
    Clearing a key that had no record (a message that leaves a conversation
    in ``START``) changes nothing and is not listed.
    """

    writes: list[StateWrite] = field(default_factory=list)
    error: BaseException | None = None

    def record(self, write: StateWrite) -> None:
        for i, old in enumerate(self.writes):
            if old.key == write.key:
                if old.op == "insert" and write.op == "update":
                    return  # still a new row: the commit inserts it with its latest values
                if old.op == "insert" and write.op == "delete":
                    del self.writes[i]  # made and removed in one run: nothing is written
                    return
                self.writes[i] = StateWrite(write.key, write.op, old.before, write.after, write.data)
                return
        if write.op == "clear" and write.before is None:
            return  # a key with no record stays without one (START -> START): nothing changed
        self.writes.append(write)

    def reset(self) -> None:
        """Forget the writes of an attempt that was rolled back and is run again (a conflict)."""
        self.writes.clear()
        self.error = None


def _is_application_file(filename: str, app_dir: str | None) -> bool:
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    if app_dir and path.startswith(str(Path(app_dir).resolve()) + os.sep):
        return True
    if path.startswith(_PACKAGE_DIR) or filename.startswith("<"):
        return False
    return not any(path.startswith(d) for d in _LIBRARY_DIRS)


def failure_location(exc: BaseException, app_dir: str | None = None) -> str:
    """``FILE:LINE in FUNCTION`` of the innermost application frame of `exc`'s traceback.

    Application code is a file under `app_dir`, or anywhere outside
    lamsonfilter, the standard library and installed packages.  A file
    under `app_dir` is named relative to it.  When no frame is the
    application's (the failure was in lamsonfilter itself, say a database
    error at commit), the innermost frame is named.  ``"-"`` without a
    traceback.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "-"
    chosen = next((f for f in reversed(frames) if _is_application_file(f.filename, app_dir)), frames[-1])
    name = chosen.filename
    if app_dir:
        try:
            name = str(Path(name).resolve().relative_to(Path(app_dir).resolve()))
        except ValueError:
            pass
    return f"{name}:{chosen.lineno} in {chosen.name}"


def describe_failure(exc: BaseException, app_dir: str | None = None) -> str:
    """One line for the log: ``KeyError: 'count' at app/handlers/list.py:42 in START``."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text} at {failure_location(exc, app_dir)}"


def format_traceback(exc: BaseException) -> str:
    """The whole traceback of `exc`, as Python prints it (no trailing newline)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
