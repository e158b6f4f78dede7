"""Named fault points: where the reliability tests stop a daemon to kill it (R4, D3, M1).

A daemon started with ``LAMSONFILTER_FAULT_POINTS=smtpproxy.after_commit`` (a
comma-separated list of names) and ``LAMSONFILTER_FAULT_DIR=/some/dir`` stops
the first time it reaches each named point: it writes ``DIR/NAME.reached``
(containing the queue id) and then waits, doing nothing, until the test kills
it (bounded: it gives up after `HOLD_SECONDS` and carries on).  Without the
environment variables `reached` costs one truth test of an empty frozenset.

The points (see docs/reliability.rst):

``smtpproxy.after_data``
    the whole message is received from Postfix, nothing is decided yet;
``smtpproxy.after_commit``
    the application's decision (state, replay record, outbox) is committed,
    nothing reinjected yet;
``smtpproxy.after_reinject``
    the reinjection server answered 250 to the final dot, Postfix has not yet
    had our 250 (the one window where a duplicate is allowed, R4);
``milter.eom``
    the milter has the whole message, nothing is decided yet;
``milter.after_commit``
    the decision is committed, the verdict not yet returned to Postfix.

This is test instrumentation in product code on purpose: the tests must kill
the real daemon at a known place, and a point that is never configured does
nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["POINTS", "reached", "HOLD_SECONDS"]

POINTS = frozenset({
    "smtpproxy.after_data", "smtpproxy.after_commit", "smtpproxy.after_reinject",
    "milter.eom", "milter.after_commit",
})

#: Longest a configured point holds (a test that forgot to kill must not hang forever).
HOLD_SECONDS = 300.0

_ARMED = frozenset(p.strip() for p in os.environ.get("LAMSONFILTER_FAULT_POINTS", "").split(",") if p.strip())
_DIR = os.environ.get("LAMSONFILTER_FAULT_DIR", "")
_UNKNOWN = _ARMED - POINTS
if _UNKNOWN:
    raise SystemExit(f"LAMSONFILTER_FAULT_POINTS names unknown fault point(s): {', '.join(sorted(_UNKNOWN))}; "
                     f"known: {', '.join(sorted(POINTS))}")
_fired: set[str] = set()


def reached(point: str, queue_id: str | None = None) -> None:
    """Hold here if the tests armed `point` (once per process); otherwise return at once."""
    if not _ARMED or point not in _ARMED or point in _fired:
        return
    _fired.add(point)
    if _DIR:
        marker = Path(_DIR) / f"{point}.reached"
        marker.write_text(f"{queue_id or '-'} {os.getpid()}\n")
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
