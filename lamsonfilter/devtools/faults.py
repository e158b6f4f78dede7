"""Named fault points: where the reliability tests stop a running daemon to kill it.

A daemon started with ``LAMSONFILTER_FAULT_POINTS=smtpproxy.after_commit`` (a
comma-separated list of names) and ``LAMSONFILTER_FAULT_DIR=/some/dir`` stops
the first time it reaches each named point: it writes ``DIR/NAME.reached``
(containing the queue id) and then waits, doing nothing, until the test kills
it (bounded: it gives up after `HOLD_SECONDS` and carries on).

The points (docs/reliability.rst says which requirement each one proves):

``smtpproxy.after_data``
    the whole message is received from Postfix, nothing is decided yet;
``smtpproxy.after_commit``
    the application's decision (state, replay record, outbox) is committed,
    nothing reinjected yet;
``smtpproxy.after_reinject``
    the reinjection server answered 250 to the final dot, Postfix has not yet
    had our 250 (the one window where the same message may be delivered twice);
``milter.eom``
    the milter has the whole message, nothing is decided yet;
``milter.after_commit``
    the decision is committed, the verdict not yet returned to Postfix.

This is the one seam between the product and the development tools: the two
transports call `reached` at these places.  Unless a test sets the
environment variable the points are inert: importing this module reads
nothing and raises nothing, and `reached` costs one look-up in the environment.  Only
when the variable is set is it read (once, at the first point reached), and
a name that is not a fault point then raises `FaultPointError`, so a typo in
a test fails loudly instead of never stopping.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["FaultPointError", "HOLD_SECONDS", "POINTS", "armed", "reached"]

POINTS = frozenset({
    "smtpproxy.after_data", "smtpproxy.after_commit", "smtpproxy.after_reinject",
    "milter.eom", "milter.after_commit",
})

#: Longest a configured point holds (a test that forgot to kill must not hang forever).
HOLD_SECONDS = 300.0

_ENV = "LAMSONFILTER_FAULT_POINTS"
_fired: set[str] = set()
_armed_cache: dict[str, frozenset[str]] = {}


class FaultPointError(ValueError):
    """The tests armed a name that is not a fault point."""


def armed() -> frozenset[str]:
    """The points the environment arms (read once per process); empty when none is set.

    Raises `FaultPointError` when the environment names an unknown point.
    """
    spec = os.environ.get(_ENV, "")
    if not spec:
        return frozenset()
    cached = _armed_cache.get(spec)
    if cached is not None:
        return cached
    names = frozenset(p.strip() for p in spec.split(",") if p.strip())
    unknown = names - POINTS
    if unknown:
        raise FaultPointError(f"{_ENV} names unknown fault point(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(POINTS))}")
    _armed_cache[spec] = names
    return names


def reached(point: str, queue_id: str | None = None) -> None:
    """Hold here if the tests armed `point` (once per process); otherwise return at once."""
    if point in _fired or point not in armed():
        return
    _fired.add(point)
    fault_dir = os.environ.get("LAMSONFILTER_FAULT_DIR", "")
    if fault_dir:
        marker = Path(fault_dir) / f"{point}.reached"
        marker.write_text(f"{queue_id or '-'} {os.getpid()}\n")
    deadline = time.monotonic() + HOLD_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
