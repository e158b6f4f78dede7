"""Real mail through the example application, via the same code as ``lamsonfilter test``.

Every bounce of ../shared/corpus/bounces/ and every message of CPython's
test/test_email/data/ goes through: no crash, no exception escaping, and
zero automatic replies to any bounce, whoever the envelope says sent it.
"""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamsonfilter.cli import main

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mailinglist"
BOUNCES = ROOT.parent / "shared" / "corpus" / "bounces"
HOST = "lists.example.org"
# every kind of address the application answers
RCPTS = [f"python@{HOST}", f"python-subscribe@{HOST}", f"python-unsubscribe@{HOST}",
         f"help@{HOST}", f"python-info@{HOST}", f"python-confirm-{'0' * 32}@{HOST}"]


def need(path: Path, what: str) -> Path:
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} missing at {path} (CI must have it)")
        pytest.skip(f"{what} not found at {path}")
    return path


def cpython_email_data() -> Path:
    try:
        import test.test_email as te
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("this Python has no 'test' package (CPython's test/test_email/data is needed in CI)")
        pytest.skip("this Python has no 'test' package, so no test/test_email/data")
    return need(Path(te.__file__).parent / "data", "CPython's test_email data")


def run(messages: list[Path], *extra: str) -> list[dict]:
    args = ["test", "--app", str(APP), "--json", "--database", "memory:"]
    for r in RCPTS:
        args += ["--rcpt", r]
    result = CliRunner().invoke(main, [*args, *extra, *map(str, messages)], catch_exceptions=False)
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert lines, result.output
    return [*lines, {"exit_code": result.exit_code}]


@pytest.mark.parametrize("sender", [None, "someone@example.net"], ids=["envelope-from-headers", "forged-sender"])
def test_no_bounce_gets_an_automatic_reply(sender):
    corpus = need(BOUNCES, "the bounce corpus")
    files = sorted(corpus.glob("*.eml"))
    assert len(files) >= 80
    extra = ["--sender", sender] if sender else []
    out = run(files, *extra)
    code = out.pop()["exit_code"]
    assert len(out) == len(files)
    assert [o["file"] for o in out if o.get("error")] == []
    assert code == 0
    replied = [(o["file"], m) for o in out for m in o["outbox_messages"] if m["kind"] == "reply"]
    assert replied == []
    # and the application did see them: every recipient was routed, none passed through
    assert all(r["route"] for o in out for r in o["recipients"])


def test_cpython_email_data_never_crashes_the_application():
    data = cpython_email_data()
    files = sorted(p for p in data.iterdir() if p.is_file() and p.name.startswith("msg_"))
    assert len(files) > 40
    out = run(files, "--sender", "tester@example.net")
    code = out.pop()["exit_code"]
    errors = [(o["file"], o.get("error")) for o in out if o.get("error")]
    # a file with no header at all (msg_19.txt: a digest's body text) is refused as "not a mail
    # message" -- a clear error, not a crash; nothing else may fail
    refused = [f for f, e in errors if e.startswith("not a mail message: it does not start with a header")]
    assert all(b":" not in Path(f).read_bytes().split(b"\n", 1)[0] for f in refused)
    assert len(refused) <= 2 and [e for e in errors if e[0] not in refused] == []
    assert code == (1 if refused else 0)
    assert len(out) == len(files)
