"""Two filter hosts on one PostgreSQL database: the example list exactly once (issue 16).

The two-host rig (tests/rig/twohost.py: two private Postfix instances,
two lamsonfilter processes, one database of the test's own on the server
at 127.0.0.1:5432, one capture server) carries the example list through
tests/rig/twohost_list.py's three phases: subscribers spread over
both hosts, each confirming through the *other* host, then posts.  Every
subscriber must get exactly one confirmation request and one welcome,
every member exactly one copy of every post.

SIGKILLs: a kill during an outbox flush leaves claims that the other host
takes over only when their lease (5 minutes) has passed, so one such run
may take 15 minutes; the default suite runs it for the pairing with both
modes (smtpproxy+milter), ``LF_TWOHOST_KILLS=all`` (or the full size) for
every pairing.

Size: the default suite runs the same-shaped small run (`SMALL`: 40
subscribers, 10 posts); ``LF_TWOHOST_FULL=1`` (``make twohost``) runs the
issue's full size (`FULL`: 200 subscribers, 50 posts).  With
``LF_RELIABILITY_FIGURES=FILE`` every run appends its figures as a JSON
line (docs/reliability.rst's table of several hosts is made from them).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.rig.twohost import TwoHostRig
from tests.rig.twohost_list import run_list
from tests.rig.accounting import figures_path
from tests.rig.fixtures import POSTFIX_BINARIES, require, require_module, skip_or_fail

SMALL = (40, 10)
FULL = (200, 50)
MODES = [("smtpproxy", "smtpproxy"), ("milter", "milter"), ("smtpproxy", "milter")]
_EVERY_PAIR = (os.environ.get("LF_TWOHOST_FULL", "").strip() in ("1", "true", "yes")
               or os.environ.get("LF_TWOHOST_KILLS") == "all")
#: The SIGKILL test's pairings: the one with both modes by default, every pairing on request.
KILL_MODES = MODES if _EVERY_PAIR else [("smtpproxy", "milter")]


def _size() -> tuple[int, int]:
    if os.environ.get("LF_TWOHOST_SIZE"):  # "SUBSCRIBERS,POSTS", for trying things out
        subscribers, posts = os.environ["LF_TWOHOST_SIZE"].split(",")
        return int(subscribers), int(posts)
    return FULL if os.environ.get("LF_TWOHOST_FULL", "").strip() in ("1", "true", "yes") else SMALL


def _rig(modes: tuple[str, str]) -> TwoHostRig:
    require(*POSTFIX_BINARIES, root=True)
    require_module("psycopg")
    if "milter" in modes:
        require_module("Milter")
    rig = TwoHostRig(modes)
    try:
        rig.database.create()
    except Exception as exc:  # noqa: BLE001 -- any failure to reach it: the server is part of the machine
        skip_or_fail(f"no PostgreSQL server at {rig.database.server_url}: {exc}")
    rig.database.drop()
    return rig


def _record(scenario: str, figures: dict[str, object]) -> None:
    path = figures_path()
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, **figures}) + "\n")


@pytest.mark.parametrize("modes", MODES, ids=["+".join(m) for m in MODES])
def test_list_through_two_hosts_exactly_once(modes: tuple[str, str]) -> None:
    subscribers, posts = _size()
    with _rig(modes) as rig:
        figures = run_list(rig, subscribers, posts)
        print(figures.summary())
        _record("two hosts", figures.as_dict())
        assert not figures.problems, f"{figures.summary()}\n{figures.problems}"
        assert figures.post_copies == subscribers * posts


@pytest.mark.parametrize("modes", KILL_MODES, ids=["+".join(m) for m in KILL_MODES])
def test_list_through_two_hosts_with_sigkills(modes: tuple[str, str]) -> None:
    """Host A's lamsonfilter is SIGKILLed once in each phase (three times) and started again.

    A kill during an outbox flush leaves claims that wait for their lease before the other
    host sends them: the rig's applications set ``OUTBOX_LEASE`` to `RIG_LEASE` (15 s, not
    the default 5 minutes), so that costs seconds, not up to 15 minutes a run.  The default
    suite runs the pair that has both modes (smtpproxy+milter); ``LF_TWOHOST_FULL=1`` or
    ``LF_TWOHOST_KILLS=all`` runs every pair."""
    subscribers, posts = _size()
    with _rig(modes) as rig:
        killed: list[int] = []
        started: list[int] = []

        def kill_and_restart(phase: str) -> None:
            killed.append(rig.kill(0))
            started.append(rig.restart(0))

        figures = run_list(rig, subscribers, posts, kill=kill_and_restart)
        print(figures.summary(), "PIDs killed:", killed, "started:", started)
        _record("two hosts, 3 SIGKILLs", figures.as_dict())
        assert figures.kills == 3 and len(set(killed)) == 3 and len(started) == 3
        assert not figures.problems, f"{figures.summary()}\n{figures.problems}"
        assert figures.post_copies == subscribers * posts
