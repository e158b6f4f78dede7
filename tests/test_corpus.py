"""The whole corpus through the example application, via the same code as ``lamsonfilter test``.

Every file of tests/corpus/ (sisimai's 80 bounces, flufl.bounce's 117 messages,
the reconstructed robots, mail with odd bytes, CPython's email test messages;
see tests/corpus/README.md)
goes through the dry run, addressed to every kind of address the example
mailing list answers: no crash, no error, and no automatic reply to any
file that tests/corpus/kinds.txt -- the oracle, written by reading each file
-- calls automated.  The oracle is independent of the detectors, so taking
one detector out makes this test report the replies that then go out
(`test_the_oracle_sees_replies_when_a_detector_is_taken_out`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamsonfilter import automated
from lamsonfilter.automated import KINDS, classify
from lamsonfilter.cli import main
from lamsonfilter.guards import ReplyBudget, ReplyRateLimit
from lamsonfilter.mail import MailRequest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mailinglist"
CORPUS = ROOT / "tests" / "corpus"
HOST = "lists.example.org"
#: every kind of address the application answers
RCPTS = [f"python@{HOST}", f"python-subscribe@{HOST}", f"python-unsubscribe@{HOST}",
         f"help@{HOST}", f"python-info@{HOST}", f"python-confirm-{'0' * 32}@{HOST}"]
#: CPython's msg_19.txt is a digest's body with no header at all: the one file the dry run
#: refuses ("not a mail message"), which is right -- it cannot be a message
NO_HEADER_BLOCK = {"cpython-email/msg_19.txt"}


def _kinds_file() -> list[list[str]]:
    rows = [line.split() for line in (CORPUS / "kinds.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    for row in rows:
        assert len(row) in (2, 3) and all(k in (*KINDS, "person") for k in row[1:]), row
    return rows


def oracle() -> dict[str, str]:
    """tests/corpus/kinds.txt: relative path -> kind (``person`` for mail a person wrote)."""
    return {row[0]: row[1] for row in _kinds_file()}


def detected() -> dict[str, str]:
    """The kind `classify` is known to find: the oracle's, or the third column of kinds.txt
    where the bounce reader misses a bounce that other signs still mark as automated."""
    return {row[0]: row[-1] for row in _kinds_file()}


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.suffix in (".eml", ".txt")
                  and p.name not in ("kinds.txt", "expected.txt") and not p.name.startswith("LICENSE"))


@pytest.fixture(autouse=True)
def no_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every reply the guards allow goes out: with the rate limit and the budget in place, one
    forged sender for all files would hide every reply after the first few (the example list
    allows 5 an hour), and the oracle would miss them."""
    monkeypatch.setattr(ReplyRateLimit, "allow", lambda self, *args, **kwargs: True)
    monkeypatch.setattr(ReplyBudget, "allow", lambda self, *args, **kwargs: True)


def dry_run(files: list[Path], *extra: str) -> tuple[list[dict], int]:
    """One JSON object per file, and the exit status, from ``lamsonfilter test --json``."""
    args = ["test", "--app", str(APP), "--json", "--database", "memory:"]
    for r in RCPTS:
        args += ["--rcpt", r]
    result = CliRunner().invoke(main, [*args, *extra, *map(str, files)], catch_exceptions=False)
    out = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    return out, result.exit_code


def replies_to_robots(out: list[dict], kinds: dict[str, str]) -> list[tuple[str, str]]:
    """(file, kind) of every automated file that got an automatic reply."""
    found = []
    for o in out:
        rel = Path(o["file"]).relative_to(CORPUS).as_posix()
        if kinds[rel] != "person" and any(m["kind"] == "reply" for m in o.get("outbox_messages", [])):
            found.append((rel, kinds[rel]))
    return found


def test_the_corpus_is_complete_and_every_file_has_a_kind() -> None:
    files = {f.relative_to(CORPUS).as_posix() for f in corpus_files()}
    kinds = oracle()
    assert files == set(kinds)
    assert len([f for f in files if f.startswith("bounces/")]) == 80
    assert len([f for f in files if f.startswith("cpython-email/")]) == 48
    assert len([f for f in files if f.startswith("robots/")]) == 5
    assert len([f for f in files if f.startswith("flufl-bounce/")]) == 117
    for licensed in ("bounces/LICENSE", "bounces/README.md", "cpython-email/LICENSE", "cpython-email/README.md",
                     "flufl-bounce/LICENSE", "flufl-bounce/LICENSE-2.0.txt", "flufl-bounce/README.md",
                     "robots/README.md", "odd-bytes/README.md", "README.md"):
        assert (CORPUS / licensed).is_file(), licensed


@pytest.mark.parametrize("sender", [None, "someone@example.net"], ids=["envelope-from-headers", "forged-sender"])
def test_the_application_never_answers_automated_mail_and_never_fails(sender: str | None) -> None:
    files = corpus_files()
    kinds = oracle()
    out, code = dry_run(files, *(["--sender", sender] if sender else []))
    assert len(out) == len(files)
    errors = [(o["file"], o["error"]) for o in out if o.get("error")]
    refused = {Path(f).relative_to(CORPUS).as_posix() for f, e in errors
               if e == "not a mail message: it does not start with a header field (such as 'From: ...')"}
    assert refused == NO_HEADER_BLOCK, errors
    assert len(errors) == len(refused), errors
    assert code == 1  # because of msg_19.txt alone
    assert replies_to_robots(out, kinds) == []
    # the application did see them: every recipient of every message was routed
    assert all(r["route"] for o in out if not o.get("error") for r in o["recipients"])
    # and it does answer people: the guards do not simply refuse everything
    kinds_of_answered = {kinds[Path(o["file"]).relative_to(CORPUS).as_posix()] for o in out
                         if not o.get("error") and any(m["kind"] == "reply" for m in o["outbox_messages"])}
    assert kinds_of_answered == {"person"}


def test_the_files_of_each_kind() -> None:
    """`classify` (what ``ctx.automated`` says) agrees with the oracle on every file."""
    kinds, expected = oracle(), detected()
    by_kind: dict[str, list[str]] = defaultdict(list)
    disagree = []
    for f in corpus_files():
        rel = f.relative_to(CORPUS).as_posix()
        found = classify(MailRequest.from_bytes(f.read_bytes(), sender="someone@example.net",
                                                recipients=[f"help@{HOST}"]))
        kind = found.kind if found is not None else "person"
        by_kind[kind].append(rel)
        if kind != expected[rel]:
            disagree.append((rel, kinds[rel], kind))
        # automated or not, classify never disagrees with the oracle
        assert (kind == "person") == (kinds[rel] == "person"), rel
    print("\n".join(f"{k}: {len(v)}: {' '.join(sorted(v))}" for k, v in sorted(by_kind.items())))
    assert disagree == []
    assert {k: len(v) for k, v in by_kind.items()} == {
        "bounce": 78 + 1 + 4 + 98, "feedback-report": 1 + 3, "auto-reply": 1 + 1 + 2, "list": 1 + 1 + 8,
        "bulk": 2 + 1, "robot": 1 + 7, "person": 44 + 1,
    }
    # the bounces the bounce reader misses, each caught by another sign
    assert len([p for p in kinds if kinds[p] != expected[p]]) == 17


@pytest.mark.parametrize(
    "taken_out, now_answered",
    [
        # the one sign of the fml notice: its list server's headers and Message-ID
        (("list-server",), {("robots/fml-loop-alert-01.eml", "list")}),
        # the vacation reply has two signs (X-Apple-Action and its subject): both must go
        (("auto-reply-headers", "auto-reply-subject"), {("robots/apple-vacation-01.eml", "auto-reply")}),
        # the JMRP reports: the report reader, and the "when in doubt" rule behind it
        (("report", "doubt"), {(f"robots/outlook-jmrp-0{i}.eml", "feedback-report") for i in (1, 2, 3)}),
    ],
    ids=["list-server", "auto-reply", "feedback-loop"],
)
def test_the_oracle_sees_replies_when_a_detector_is_taken_out(
    monkeypatch: pytest.MonkeyPatch, taken_out: tuple[str, ...], now_answered: set[tuple[str, str]]
) -> None:
    files = sorted((CORPUS / "robots").glob("*.eml"))
    kept = {k: v for k, v in automated.DETECTORS.items() if k not in taken_out}
    assert len(kept) == len(automated.DETECTORS) - len(taken_out)
    monkeypatch.setattr(automated, "DETECTORS", kept)
    out, _code = dry_run(files, "--sender", "someone@example.net")
    assert set(replies_to_robots(out, oracle())) == now_answered
