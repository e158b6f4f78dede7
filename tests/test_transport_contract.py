"""The transport contract: a transport hands the runtime a request it does not change, and the retry facts as arguments.

The three daemons are driven with routed mail while `Runtime.process` is
watched: the `MailRequest` must arrive with no replay key and no deadline
of its own (the transport does not write into it), and the replay key and
deadline must arrive as arguments.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path
from typing import Any

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]
import pytest

from lamsonfilter.contentfilter.quarantine import Quarantine
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.mail import MailRequest
from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.queueworker.worker import MessageWorker
from lamsonfilter.relay import Relay
from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.milterdrive import connect, feed, split_message
from tests.rig.postfix import free_port
from tests.rig.proxy import ProxyThread, ScriptedSMTP, make_app

RAW = (b"From: Alice <alice@example.com>\r\nTo: crash@lists.example.org\r\nSubject: hello\r\n"
       b"Message-ID: <contract-1@example.com>\r\n\r\nbody\r\n")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[MailRequest, dict[str, Any], tuple[Any, Any]]]:
    seen: list[tuple[MailRequest, dict[str, Any], tuple[Any, Any]]] = []
    original = Runtime.process

    def watched(self: Runtime, request: MailRequest, **contract: Any) -> Any:
        before = (request.replay_key, request.deadline)
        decision = original(self, request, **contract)
        seen.append((request, contract, before))
        return decision

    monkeypatch.setattr(Runtime, "process", watched)
    return seen


def _check(seen: list[tuple[MailRequest, dict[str, Any], tuple[Any, Any]]], transport: str) -> None:
    assert len(seen) == 1
    request, contract, before = seen[0]
    assert before == (None, None) and (request.replay_key, request.deadline) == (None, None)
    assert contract["transport"] == transport
    assert contract["replay_key"]  # routed mail: a retry must replay
    if transport in ("smtpproxy", "queue"):  # the milter has a deadline only with its thread pool (in `serve`)
        assert contract["deadline"] > time.monotonic() - 60


def test_the_milter_keeps_to_the_contract(tmp_path: Path, calls: list[Any]) -> None:
    runtime = Runtime.from_directory(make_app(tmp_path / "app"), {"DATABASE": "memory:"})
    m, _ = connect(runtime, macros={"i": "4QCONTRACT"})
    assert feed(m, ["crash@lists.example.org"], *split_message(RAW)) == Milter.TEMPFAIL
    _check(calls, "milter")


def test_the_content_filter_keeps_to_the_contract(tmp_path: Path, calls: list[Any]) -> None:
    with ScriptedSMTP() as scripted, ProxyThread(ProxyConfig(
            app_dir=make_app(tmp_path / "app"), listen=("127.0.0.1", free_port()),
            reinject=("127.0.0.1", scripted.port))) as proxy:
        with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test", timeout=30) as s, \
                pytest.raises(smtplib.SMTPDataError):
            s.sendmail("alice@example.com", ["crash@lists.example.org"], RAW)
    _check(calls, "smtpproxy")


def test_the_queue_worker_keeps_to_the_contract(tmp_path: Path, calls: list[Any]) -> None:
    runtime = Runtime.from_directory(make_app(tmp_path / "app"))
    queue = MailQueue(tmp_path / "queue")
    name = queue.put(RAW, "alice@example.com", "crash@lists.example.org")
    worker = MessageWorker(runtime, queue, Quarantine(tmp_path / "quarantine"), Relay("127.0.0.1", free_port()))
    try:
        assert worker.handle(name) == "retry"
    finally:
        runtime.stop()
    _check(calls, "queue")
    request, contract, _ = calls[0]
    assert request.from_queue and request.queue_id == name
    assert contract["replay_key"] == f"queue:{name}"  # the queue name never changes across retries
