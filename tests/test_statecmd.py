"""``lamsonfilter state list|show``: the state of keys, read from the application's database."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lamsonfilter.cli import main

APP = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
SUBSCRIBE = (APP / "samples" / "01-subscribe.eml").read_bytes()


def invoke(*args: object, input: bytes | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def test_list_and_show_the_keys_a_message_wrote(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/state.db"
    assert invoke("db", "init", "--app", APP, "--database", db).exit_code == 0
    assert invoke("test", "--app", APP, "--database", db, "--commit", "-q", input=SUBSCRIBE).exit_code == 0
    key = "mailinglist:python:alice@example.com"
    r = invoke("state", "list", "--app", APP, "--database", db, "mailinglist:")
    assert r.exit_code == 0
    [line] = [x for x in r.output.splitlines() if x.startswith("mailinglist:")]
    assert line.startswith(f"{key}  PENDING  {{")
    objs = [json.loads(x) for x in invoke("state", "list", "--app", APP, "--database", db, "--json").output.splitlines()]
    assert {o["key"] for o in objs} == {key, "lamsonfilter:rate:mailinglist:alice@example.com",
                                        "lamsonfilter:budget"}  # the reply limit and budget, shared
    shown = json.loads(invoke("state", "show", "--app", APP, "--database", db, "--json", key).output)
    assert shown["state"] == "PENDING" and shown["data"]["expires"] > 0  # the token is the engine's, not here
    r = invoke("state", "show", "--app", APP, "--database", db, key)
    assert r.exit_code == 0 and "state: PENDING" in r.output and "  expires = " in r.output
    r = invoke("state", "show", "--app", APP, "--database", db, "mailinglist:python:nobody@example.com")
    assert r.exit_code == 1 and "no state (START)" in r.output
    assert len(invoke("state", "list", "--app", APP, "--database", db, "--limit", "1").output.splitlines()) == 2


def test_a_database_that_does_not_exist_is_one_line_and_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "none.db"
    r = invoke("state", "list", "--app", APP, "--database", f"sqlite:///{db}")
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1 and "does not exist yet" in r.output
    assert not db.exists()
