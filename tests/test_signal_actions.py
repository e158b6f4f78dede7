"""What each signal means, said once (`lamsonfilter.daemon.process.SignalActions`) for every daemon.

SIGTERM and SIGINT stop, SIGHUP reloads, SIGUSR1 wakes the outbox (only
where a `wake` is given).  The asyncio form is checked with real signals
sent to this process (by its own PID), as the content filter receives them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from lamsonfilter.daemon.process import SignalActions, SignalWaiter


def test_each_signal_means_one_thing(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    actions = SignalActions(stop=lambda name: seen.append(f"stop {name}"), reload=lambda: seen.append("reload"),
                            wake=lambda: seen.append("wake"))
    with caplog.at_level(logging.INFO, logger="lamsonfilter"):
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            actions(signum)
    assert seen == ["reload", "wake", "stop SIGTERM", "stop SIGINT"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["SIGHUP: reloading the application", "SIGTERM: stopping", "SIGINT: stopping"]


def test_without_wake_sigusr1_is_not_taken() -> None:
    actions = SignalActions(stop=lambda name: None, reload=lambda: None)
    assert signal.SIGUSR1 not in actions.signals
    assert set(actions.signals) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    assert SignalWaiter.SIGNALS == frozenset(actions.signals)  # the milter waits for the same ones


def test_on_an_asyncio_loop_real_signals_reload_then_stop() -> None:
    seen: list[str] = []

    async def serve() -> None:
        stop = asyncio.Event()

        def on_stop(name: str) -> None:
            seen.append(name)
            stop.set()

        SignalActions(stop=on_stop, reload=lambda: seen.append("reload")).add_to_loop(asyncio.get_running_loop())
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):  # bounded: the handler runs on one of the next loop iterations
            if seen:
                break
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)

    asyncio.run(serve())  # closing the loop removes its handlers
    assert seen == ["reload", "SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
