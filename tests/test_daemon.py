"""lamsonfilter.daemon.process.SignalWaiter: signals reach the main thread, never a C library's sigwait thread."""

from __future__ import annotations

import os
import signal
import threading

from lamsonfilter.daemon.process import SignalWaiter


def _sigwait_thread(taken: list[object], started: threading.Event) -> threading.Thread:
    """A thread like libmilter's signal thread: it blocks the signals and sigwait()s for them."""

    def run() -> None:
        SignalWaiter.block_here()
        started.set()
        taken.append(signal.sigtimedwait(SignalWaiter.SIGNALS, 2.0))

    return threading.Thread(target=run, daemon=True)


def test_a_signal_sent_before_wait_is_kept_for_the_main_thread_not_taken_by_a_sigwait_thread() -> None:
    taken: list[object] = []
    reloads: list[int] = []
    started = threading.Event()
    with SignalWaiter() as signals:
        thread = _sigwait_thread(taken, started)
        thread.start()
        assert started.wait(10)
        os.kill(os.getpid(), signal.SIGHUP)  # start-up window: the main thread is not in wait()
        os.kill(os.getpid(), signal.SIGTERM)
        thread.join(10)
        assert taken == [None], f"the sigwait thread took {taken}"
        calls = iter([True, True, False])
        assert signals.wait(lambda: next(calls), lambda: reloads.append(1)) == "SIGTERM"
    assert reloads == [1]


def test_wait_returns_none_when_the_engine_stops_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with SignalWaiter() as signals:
        assert signal.getsignal(signal.SIGTERM) != before
        assert signals.wait(lambda: False, lambda: None) is None
    assert signal.getsignal(signal.SIGTERM) == before
