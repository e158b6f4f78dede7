"""Message accounting for the fault suite: nothing lost (docs/reliability.rst).

Every message a test injects carries ``X-Test-Seq: RUN-I`` and a unique
Message-ID; after the fault and the recovery, `account` finds each seq in
one of these places:

``delivered``
    a message at the deployment's `CaptureServer` with the seq in its top
    header block (copies counted per (seq, recipient): `duplicates`);
``bounced``
    a DSN (``MAIL FROM:<>``, ``multipart/report``, ``Action: failed``) at
    the capture server whose returned message or headers carry the seq;
``queued``
    still in Postfix's queue (``postqueue -j``, then ``postcat -bh -q ID``);
``discarded``
    an explicit decision of lamsonfilter: a copy in the quarantine Maildir
    (APP/var/quarantine), a ``decision=drop|reject|quarantine`` line in the
    filter log, or Postfix's ``milter-discard`` line, for the queue id the
    client was given;
``rejected``
    the client saw a 5xx at MAIL/RCPT/DATA/dot and Postfix never queued it
    (milter mode) -- the sender knows;
``tempfailed``
    the client saw a 4xx (or the connection broke) and nothing was queued:
    the *client* keeps the message.  That only counts as accounted when the
    test says so (``account(..., client_keeps_tempfailed=True)``); normally
    a test resends them first, as a real client would
    (`Injector.resend_tempfailed`).

Invariant: injected = delivered ∪ bounced ∪ queued ∪ discarded ∪ rejected
(∪ tempfailed when the client keeps them); ``lost`` is the rest.  The
maillog cross-check (the one log line per message with its queue id,
requirement O4 of docs/reliability.rst) adds `Accounting.anomalies`: an injected queue id
whose recipient reached more than one final ``status=sent|bounced``, or
none while the message is no longer queued and not discarded.

    inj = Injector(dep, "r1")
    sent = inj.inject(20, parallel=4)
    acc = account(dep, sent, scenario="smtp-sink refuses the final dot")
    acc.assert_nothing_lost()
    print(acc.summary())  # injected 20 delivered 20 bounced 0 queued 0 ...

With ``LF_RELIABILITY_FIGURES=/path/figures.jsonl`` every `account` call
that names a ``scenario`` appends one JSON line (scenario, mode, counts,
plus whatever `Accounting.record` is given) -- the docs table is made from it.

Safety: loopback only; every wait is bounded (`wait_settled`); nothing is
signalled here.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

from tests.rig.deploy import Deployment
from tests.rig.postfix import CapturedMessage, find_binary
from tests.rig.submission import Reply, SendResult, smtp_transaction

__all__ = [
    "Accounting",
    "Injected",
    "Injector",
    "LostMail",
    "account",
    "bounced_seqs",
    "delivered_seqs",
    "figures_path",
    "maillog_anomalies",
    "seqs_in_header",
    "stamped_message",
    "wait_settled",
]

SEQ_HEADER = "X-Test-Seq"
_SEQ_IN_HEADER = re.compile(rb"^X-Test-Seq:[ \t]*([^\s]+)", re.MULTILINE | re.IGNORECASE)
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
_MILTER_DISCARD = re.compile(r"\b([0-9A-Za-z]+): milter-discard")
#: Upper bound on injector threads, whatever a test asks for.
MAX_PARALLEL = 64
#: Default bound on `account`'s wait for the queue to drain or settle (seconds).
ACCOUNT_TIMEOUT = 180.0


class LostMail(AssertionError):
    """`Accounting.assert_nothing_lost` found an unexplained seq (or too many duplicates)."""


# --------------------------------------------------------------------------- injection


@dataclass(frozen=True)
class Injected:
    """One injected message: its seq, Message-ID, envelope, bytes and every attempt's replies."""

    seq: str
    message_id: str
    sender: str
    rcpts: tuple[str, ...]
    raw: bytes
    attempts: tuple[SendResult, ...]

    @property
    def result(self) -> SendResult:
        """The latest attempt."""
        return self.attempts[-1]

    @property
    def queue_id(self) -> str | None:
        """The queue id from "250 ... queued as X" of the accepted attempt, if any."""
        for attempt in reversed(self.attempts):
            final = attempt.final
            if final is not None and 200 <= final.code < 300:
                m = _QUEUED_AS.search(final.text)
                return m.group(1) if m else None
        return None

    @property
    def queue_ids(self) -> tuple[str, ...]:
        """Queue ids of every attempt that got one (a resend may have been queued twice)."""
        ids = []
        for attempt in self.attempts:
            final = attempt.final
            if final is not None and 200 <= final.code < 300:
                m = _QUEUED_AS.search(final.text)
                if m:
                    ids.append(m.group(1))
        return tuple(ids)

    @property
    def accepted(self) -> bool:
        return any(a.accepted for a in self.attempts)

    @property
    def tempfailed(self) -> bool:
        """Not accepted, and the latest attempt ended in a 4xx or a broken connection."""
        return not self.accepted and _is_tempfail(self.result)

    @property
    def rejected(self) -> bool:
        """Not accepted, and the latest attempt ended in a 5xx (the client was told "never")."""
        return not self.accepted and not _is_tempfail(self.result)


def _is_tempfail(result: SendResult) -> bool:
    if result.error is not None:
        return True
    refusals = [r for r in result.replies if r.command not in ("EHLO",) and r.code >= 400]
    return not refusals or any(400 <= r.code < 500 for r in refusals)


def stamped_message(seq: str, *, sender: str, rcpts: Sequence[str], subject: str = "reliability {seq}",
                    body: str = "reliability test message {seq}\n",
                    extra_headers: dict[str, str] | None = None) -> tuple[str, bytes]:
    """(Message-ID, CRLF bytes) of one message stamped ``X-Test-Seq: seq`` with a unique Message-ID:
    what `Injector` sends, and what a rig that puts mail somewhere else (a queue) writes."""
    msg = EmailMessage(policy=SMTP_POLICY)
    message_id = f"<{seq}.{uuid.uuid4().hex}@client.example.test>"
    msg["From"] = sender or "MAILER-DAEMON@client.example.test"
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = subject.format(seq=seq)
    msg["Message-ID"] = message_id
    msg[SEQ_HEADER] = seq
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg.set_content(body.format(seq=seq))
    return message_id, msg.as_bytes()


class Injector:
    """Sends X-Test-Seq stamped messages to the deployment's Postfix smtpd; records every reply.

    ``Injector(dep, "r1").inject(20)`` sends seqs ``r1-0`` .. ``r1-19``; a
    second ``inject`` on the same injector continues the numbering.
    """

    def __init__(self, dep: Deployment, run: str) -> None:
        self.dep = dep
        self.run = run
        self._next = 0
        self._lock = threading.Lock()

    def _numbers(self, n: int) -> range:
        with self._lock:
            start, self._next = self._next, self._next + n
        return range(start, start + n)

    def build(self, seq: str, *, sender: str, rcpts: Sequence[str], subject: str, body: str,
              extra_headers: dict[str, str] | None) -> tuple[str, bytes]:
        """(Message-ID, CRLF bytes) of one stamped message."""
        return stamped_message(seq, sender=sender, rcpts=rcpts, subject=subject, body=body,
                               extra_headers=extra_headers)

    def inject(
        self,
        n: int,
        *,
        sender: str = "inject@client.example.test",
        rcpts: Sequence[str] = ("sink@example.net",),
        parallel: int = 1,
        per_session: int = 1,
        subject: str = "reliability {seq}",
        body: str = "reliability test message {seq}\n",
        extra_headers: dict[str, str] | None = None,
    ) -> list[Injected]:
        """Send `n` messages over `parallel` connections (at most `MAX_PARALLEL`), `per_session`
        transactions per SMTP connection; never raises for SMTP errors (they are recorded)."""
        assert n >= 0 and parallel >= 1 and per_session >= 1
        seqs = [f"{self.run}-{i}" for i in self._numbers(n)]
        built = [(seq, *self.build(seq, sender=sender, rcpts=rcpts, subject=subject, body=body,
                                   extra_headers=extra_headers)) for seq in seqs]
        batches = [built[i:i + per_session] for i in range(0, len(built), per_session)]
        rcpt_tuple = tuple(rcpts)

        def send_batch(batch: list[tuple[str, str, bytes]]) -> list[Injected]:
            results = self._send_session(sender, rcpt_tuple, [raw for _, _, raw in batch])
            return [Injected(seq, mid, sender, rcpt_tuple, raw, (res,))
                    for (seq, mid, raw), res in zip(batch, results)]

        out: list[Injected] = []
        workers = max(1, min(parallel, MAX_PARALLEL, len(batches) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inject") as pool:
            for items in pool.map(send_batch, batches):
                out.extend(items)
        return out

    def resend(self, item: Injected) -> Injected:
        """Send the same bytes again (same seq and Message-ID), as a client does after a 4xx."""
        (result,) = self._send_session(item.sender, item.rcpts, [item.raw])
        return Injected(item.seq, item.message_id, item.sender, item.rcpts, item.raw, (*item.attempts, result))

    def resend_tempfailed(self, injected: Sequence[Injected], *, attempts: int = 3,
                          pause: float = 2.0) -> list[Injected]:
        """Resend every message whose latest attempt was tempfailed, up to `attempts` rounds
        (`pause` seconds apart); returns the list with those entries updated."""
        current = list(injected)
        for round_ in range(attempts):
            todo = [i for i, item in enumerate(current) if item.tempfailed]
            if not todo:
                break
            if round_:
                time.sleep(pause)
            for i in todo:
                current[i] = self.resend(current[i])
        return current

    def _send_session(self, sender: str, rcpts: tuple[str, ...], raws: Sequence[bytes]) -> list[SendResult]:
        """One SMTP connection, one transaction per message (RSET after a failed one)."""
        pf = self.dep.postfix
        assert pf is not None, "Postfix is not running"
        results = [SendResult() for _ in raws]
        done = 0
        try:
            with smtplib.SMTP("127.0.0.1", pf.smtpd_port, local_hostname="client.example.test",
                              timeout=120) as smtp:
                code, text = smtp.ehlo()
                for result, raw in zip(results, raws):
                    result.replies.append(Reply("EHLO", code, _text(text)))
                    if not smtp_transaction(smtp, sender, rcpts, raw, result):
                        smtp.rset()
                    done += 1
        except (smtplib.SMTPException, OSError) as exc:
            for result in results[done:]:
                result.error = f"{type(exc).__name__}: {exc}"
        return results


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- parsing what arrived


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i + len(sep)], data[i + len(sep):]
    return data, b""


def seqs_in_header(data: bytes) -> list[str]:
    """X-Test-Seq values in the top header block of `data` (not in attachments)."""
    head, _ = _split_head(data)
    return [m.group(1).decode("ascii", "replace") for m in _SEQ_IN_HEADER.finditer(head)]


def is_dsn(msg: CapturedMessage) -> bool:
    """A delivery status notification from the MTA: null sender and multipart/report."""
    head, _ = _split_head(msg.data)
    return msg.mail_from in ("", "<>") and re.search(rb"(?im)^Content-Type:\s*multipart/report", head) is not None


def delivered_seqs(messages: Iterable[CapturedMessage]) -> Counter[tuple[str, str]]:
    """(seq, recipient) -> copies, for every non-DSN message with an X-Test-Seq in its header."""
    copies: Counter[tuple[str, str]] = Counter()
    for msg in messages:
        if is_dsn(msg):
            continue
        for seq in set(seqs_in_header(msg.data)):
            for rcpt in msg.rcpt_tos:
                copies[(seq, rcpt.lower())] += 1
    return copies


def bounced_seqs(messages: Iterable[CapturedMessage]) -> set[str]:
    """Seqs named in the returned message/headers of a DSN whose action is "failed"."""
    seqs: set[str] = set()
    for msg in messages:
        if not is_dsn(msg):
            continue
        _, body = _split_head(msg.data)
        if not re.search(rb"(?im)^Action:\s*failed", body):
            continue  # a delay warning or a success notice is no bounce
        seqs.update(m.group(1).decode("ascii", "replace") for m in _SEQ_IN_HEADER.finditer(body))
    return seqs


def replies(messages: Iterable[CapturedMessage]) -> list[CapturedMessage]:
    """Captured mail that is neither a seq'd message nor a DSN: what the application generated."""
    return [m for m in messages if not is_dsn(m) and not seqs_in_header(m.data)]


# --------------------------------------------------------------------------- the maillog (queue ids)

_STATUS = re.compile(r" ([0-9A-Za-z]{6,}): to=<([^>]*)>,.* status=(\w+)")
_REMOVED = re.compile(r" ([0-9A-Za-z]{6,}): removed$")


def maillog_anomalies(maillog: str, queue_ids: dict[str, str], still_queued: set[str],
                      excused: set[str]) -> list[str]:
    """Every injected queue id's recipients reach exactly one final ``status=sent|bounced``.

    `queue_ids` maps queue id -> seq; ids in `still_queued` may have none yet
    (deferred is not final); seqs in `excused` (discarded by an explicit
    decision) may have none at all.  Postfix reuses short queue ids once a
    queue file is gone (the id is the file's inode and a microsecond count),
    so status lines are counted per life of an id: a life ends at its
    ``QID: removed`` line.  Two final statuses within one life are an anomaly.
    """
    finals: Counter[tuple[str, int, str]] = Counter()
    life: Counter[str] = Counter()
    seen: set[str] = set()
    for line in maillog.splitlines():
        m = _STATUS.search(line)
        if m:
            qid, rcpt, status = m.groups()
            if qid in queue_ids:
                seen.add(qid)
                if status in ("sent", "bounced"):
                    finals[(qid, life[qid], rcpt.lower())] += 1
            continue
        r = _REMOVED.search(line)
        if r and r.group(1) in queue_ids:
            life[r.group(1)] += 1
    problems = [f"{qid} ({queue_ids[qid]}) to=<{rcpt}>: {n} final status lines"
                + "".join(f"\n      | {line}" for line in maillog.splitlines() if f" {qid}: " in line)
                for (qid, _life, rcpt), n in sorted(finals.items()) if n > 1]
    final_ids = {q for q, _l, _r in finals}
    for qid, seq in sorted(queue_ids.items()):
        if qid in still_queued or seq in excused:
            continue
        if qid not in final_ids:
            problems.append(f"{qid} ({seq}): no final status=sent|bounced and not queued"
                            + ("" if qid in seen else " (never in a status line)"))
    return problems


# --------------------------------------------------------------------------- the accounting


def figures_path() -> Path | None:
    value = os.environ.get("LF_RELIABILITY_FIGURES", "").strip()
    return Path(value) if value else None


@dataclass
class Accounting:
    """Where every injected seq ended up; `lost` is what no set explains."""

    injected: list[str]
    delivered_copies: Counter[tuple[str, str]] = field(default_factory=Counter)
    bounced: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    discarded: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    tempfailed: set[str] = field(default_factory=set)
    client_keeps_tempfailed: bool = False
    anomalies: list[str] = field(default_factory=list)
    replies: int = 0  # captured mail without a seq (application replies, list posts' extra copies)
    mode: str = "-"
    scenario: str | None = None

    @property
    def delivered(self) -> set[str]:
        return {seq for seq, _ in self.delivered_copies}

    @property
    def duplicates(self) -> dict[str, int]:
        """seq -> largest number of copies one recipient got, for seqs delivered more than once."""
        dups: dict[str, int] = {}
        for (seq, _), n in self.delivered_copies.items():
            if n > 1:
                dups[seq] = max(n, dups.get(seq, 0))
        return dict(sorted(dups.items()))

    @property
    def accounted(self) -> set[str]:
        found = self.delivered | self.bounced | self.queued | self.discarded | self.rejected
        return found | self.tempfailed if self.client_keeps_tempfailed else found

    @property
    def lost(self) -> list[str]:
        accounted = self.accounted
        return [seq for seq in self.injected if seq not in accounted]

    def counts(self) -> dict[str, int]:
        injected = set(self.injected)
        return {
            "injected": len(self.injected),
            "delivered": len(self.delivered & injected),
            "bounced": len(self.bounced & injected),
            "queued": len(self.queued & injected),
            "discarded": len(self.discarded & injected),
            "rejected": len(self.rejected & injected),
            "lost": len(self.lost),
            "duplicated": len(self.duplicates),
            "tempfailed_client_keeps": len(self.tempfailed & injected) if self.client_keeps_tempfailed else 0,
            "replies": self.replies,
            "anomalies": len(self.anomalies),
        }

    def summary(self) -> str:
        c = self.counts()
        line = " ".join(f"{k} {c[k]}" for k in
                        ("injected", "delivered", "bounced", "queued", "discarded", "rejected", "lost", "duplicated"))
        if c["tempfailed_client_keeps"]:
            line += f" (tempfailed, kept by the client: {c['tempfailed_client_keeps']})"
        return line

    def record(self, scenario: str | None = None, **extra: Any) -> None:
        """Append one JSON line to $LF_RELIABILITY_FIGURES (if set): scenario, mode, counts, `extra`."""
        path = figures_path()
        name = scenario or self.scenario
        if path is None or name is None:
            return
        row = {"scenario": name, "mode": self.mode, **self.counts(),
               "duplicates": self.duplicates, **extra}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")

    def assert_nothing_lost(self, *, allow_duplicates: int = 0, allow_queued: bool = True,
                            check_maillog: bool = True) -> None:
        """Raise `LostMail` for any lost seq, more than `allow_duplicates` duplicated seqs,
        anything still queued when `allow_queued` is False, or a maillog anomaly."""
        problems = []
        if self.lost:
            problems.append(f"lost {len(self.lost)}: {self.lost[:20]}")
        if len(self.duplicates) > allow_duplicates:
            problems.append(f"{len(self.duplicates)} duplicated (allowed {allow_duplicates}): "
                            f"{list(self.duplicates.items())[:20]}")
        if not allow_queued and self.queued:
            problems.append(f"still queued: {sorted(self.queued)[:20]}")
        if check_maillog and self.anomalies:
            problems.append(f"maillog: {self.anomalies[:20]}")
        if problems:
            raise LostMail(f"{self.scenario or ''} {self.summary()}: " + "; ".join(problems))


# --------------------------------------------------------------------------- collecting


def _postfix(dep: Deployment) -> Any:
    assert dep.postfix is not None, "Postfix is not running"
    return dep.postfix


def wait_settled(dep: Deployment, timeout: float = ACCOUNT_TIMEOUT, quiet: float = 5.0) -> bool:
    """Wait until Postfix's queue is empty, or it and the destination stopped changing for
    `quiet` seconds after Postfix logged something new; at most `timeout` seconds.
    True if the queue emptied."""
    pf = _postfix(dep)
    log_at_start = len(pf.maillog())
    deadline = time.monotonic() + timeout
    last: tuple[Any, ...] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        queue = pf.queue()
        if not queue:
            return True
        snapshot = (frozenset(str(q["queue_id"]) for q in queue), len(dep.capture.messages))
        now = time.monotonic()
        if snapshot != last:
            last, since = snapshot, now
        elif now - since >= quiet and len(pf.maillog()) > log_at_start:
            return False
        time.sleep(0.5)
    return False


def _queued(dep: Deployment) -> tuple[set[str], set[str]]:
    """(seqs in queue files, queue ids in the queue)."""
    pf = _postfix(dep)
    postcat = find_binary("postcat")
    assert postcat is not None, "postcat not found"
    seqs: set[str] = set()
    ids: set[str] = set()
    for entry in pf.queue():
        qid = str(entry["queue_id"])
        ids.add(qid)
        proc = subprocess.run([postcat, "-c", str(pf.config_dir), "-bh", "-q", qid],
                              capture_output=True, timeout=60, check=False)
        if proc.returncode == 0:
            seqs.update(m.group(1).decode("ascii", "replace") for m in _SEQ_IN_HEADER.finditer(proc.stdout))
    return seqs, ids


_DECISION = re.compile(r"queue_id=(\S+) .*decision=(drop|reject|quarantine)\b")


def _discarded(dep: Deployment, by_queue_id: dict[str, str]) -> set[str]:
    seqs: set[str] = set()
    quarantine = dep.app_dir / "var" / "quarantine"
    for sub in ("new", "cur"):
        d = quarantine / sub
        if d.is_dir():
            for f in d.iterdir():
                try:
                    seqs.update(seqs_in_header(f.read_bytes()))
                except OSError:
                    continue
    try:
        log = dep.filter_log.read_text(errors="replace")
    except FileNotFoundError:
        log = ""
    for m in _DECISION.finditer(log):
        if m.group(1) in by_queue_id:
            seqs.add(by_queue_id[m.group(1)])
    for qid in _MILTER_DISCARD.findall(_postfix(dep).maillog()):  # one pass: linear in the log
        if qid in by_queue_id:
            seqs.add(by_queue_id[qid])
    return seqs


def account(
    dep: Deployment,
    injected: Sequence[Injected],
    *,
    flush: bool = True,
    timeout: float = ACCOUNT_TIMEOUT,
    quiet: float = 5.0,
    scenario: str | None = None,
    client_keeps_tempfailed: bool = False,
    record: bool = True,
) -> Accounting:
    """Optionally ``postqueue -f`` and wait (bounded, `wait_settled`); then find every seq.

    The queue is read first, the destination last: a message moving from one
    to the other in between is seen twice (harmless), never zero times.
    `client_keeps_tempfailed`: count seqs whose client saw only a 4xx as
    accounted (the test reports them as the client's; see the module docstring).
    With `scenario` (and `record`), the counts are appended to $LF_RELIABILITY_FIGURES; a test
    with more figures to add passes ``record=False`` and calls `Accounting.record` itself.
    """
    pf = _postfix(dep)
    if flush:
        pf.flush()
        wait_settled(dep, timeout, quiet)
    by_queue_id = {qid: item.seq for item in injected for qid in item.queue_ids}
    queued, queue_ids = _queued(dep)
    discarded = _discarded(dep, by_queue_id)
    captured = dep.capture.messages
    mine = {item.seq for item in injected}  # other runs' mail in the same deployment is not counted
    acc = Accounting(
        injected=[item.seq for item in injected],
        delivered_copies=Counter({k: n for k, n in delivered_seqs(captured).items() if k[0] in mine}),
        bounced=bounced_seqs(captured) & mine,
        queued=queued & mine,
        discarded=discarded & mine,
        rejected={item.seq for item in injected if item.rejected},
        tempfailed={item.seq for item in injected if item.tempfailed},
        client_keeps_tempfailed=client_keeps_tempfailed,
        replies=len(replies(captured)),
        mode=dep.mode,
        scenario=scenario,
    )
    acc.anomalies = maillog_anomalies(pf.maillog(), by_queue_id, queue_ids, acc.discarded)
    if scenario is not None and record:
        acc.record()
    return acc
