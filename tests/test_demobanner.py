"""The demo's banner is made from the application it runs (issue 14, item 7).

For the example list it shows the list's routes and its own demo.txt; for a
`gen`-erated application its route and commands made from it, never the
mailing list's; every command names the lamsonfilter executable by its
absolute path and works from any directory.
"""

import shlex
import sys
from pathlib import Path

from click.testing import CliRunner

from lamsonfilter.cli import main
from lamsonfilter.devtools.demobanner import banner, command_path, route_examples
from lamsonfilter.memorystore import MemoryStorage
from lamsonfilter.settings import load_app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mailinglist"
WORK = Path("/tmp/lamsonfilter-demo-abc123")


def _banner(app_dir: Path, port: int = 2525) -> str:
    app = load_app(app_dir, {}, storage=MemoryStorage())
    return banner(app, app_dir, mode="milter", port=port, workdir=WORK, mail_domains=("example.com",),
                  logs=[WORK / "lamsonfilter.log", WORK / "postfix" / "log" / "maillog"])


def _commands(text: str) -> list[list[str]]:
    """The shell commands of the "Try it" part, continuation lines joined, comments dropped."""
    tail = text.split("Try it", 1)[1].split("\n", 1)[1].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in tail.splitlines() if line.strip()]


def _gen(tmp_path: Path, name: str = "helpdesk") -> Path:
    result = CliRunner().invoke(main, ["gen", name, "--dest", str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    return tmp_path / name


def test_example_list_banner_shows_its_routes_and_its_demo_text():
    text = _banner(EXAMPLE, port=2626)
    for address in ("python-subscribe@lists.example.org", "python@lists.example.org",
                    "help@lists.example.org", "python-confirm-TOKEN@lists.example.org"):
        assert f"  {address}  " in text
    assert "TOKEN: [0-9a-f]{32}" in text  # a placeholder says what fills it
    commands = _commands(text)
    assert ["swaks", "--server", "127.0.0.1:2626", "--from", "alice@example.com",
            "--to", "python-subscribe@lists.example.org"] in commands
    assert ["ls", f"{WORK}/mail/inbox/new/"] in commands
    sends = [c for c in commands if c[1:2] == ["send"]]
    assert len(sends) == 2 and all(c[0] == command_path() for c in sends)
    assert "$" not in text.split("Try it", 1)[1]  # every name in demo.txt was filled in


def test_example_addresses_reach_their_routes():
    app = load_app(EXAMPLE, {}, storage=MemoryStorage())
    examples = {e.route.name: e for e in route_examples(app)}
    assert examples["mailinglist.subscribe"].ready
    assert examples["mailinglist.subscribe"].address == "python-subscribe@lists.example.org"
    confirm = examples["mailinglist.confirm"]
    assert not confirm.ready and confirm.placeholders == (("TOKEN", "[0-9a-f]{32}"),)
    for e in examples.values():
        if e.ready:
            assert app.router.match(e.address).route is e.route


def test_generated_app_banner_is_its_own(tmp_path):
    app_dir = _gen(tmp_path)
    text = _banner(app_dir)
    assert "lamsonfilter demo: helpdesk as a milter" in text
    assert "the application owns helpdesk.example.org" in text
    assert "  hello@helpdesk.example.org  helpdesk.START" in text
    for foreign in ("python", "subscribe", "lists.example.org", "confirmation"):
        assert foreign not in text.replace(command_path(), "LAMSONFILTER")
    commands = _commands(text)
    assert ["swaks", "--server", "127.0.0.1:2525", "--from", "alice@example.com",
            "--to", "hello@helpdesk.example.org"] in commands
    assert [command_path(), "send", "--server", "127.0.0.1:2525", "--from", "alice@example.com",
            "--to", "hello@helpdesk.example.org"] in commands
    # an address at its host that no route takes: refused at RCPT
    assert ["swaks", "--server", "127.0.0.1:2525", "--from", "alice@example.com",
            "--to", "no-such-address@helpdesk.example.org"] in commands
    for argv in commands:  # nothing relative to the directory the demo was started in
        assert argv[0] in ("swaks", "ls") or Path(argv[0]).is_absolute()
        assert all(Path(a).is_absolute() for a in argv[1:] if "/" in a)


def test_an_application_provides_its_own_try_it_text(tmp_path):
    app_dir = _gen(tmp_path)
    (app_dir / "demo.txt").write_text(
        "# a note for the author, not shown\n"
        "swaks --server $server --to hello@$host --body 'costs $$5'\n"
        "$lamsonfilter state --key x   # at $workdir, mail in $mailbox, hosts $hosts, port $port\n"
        "$unknown stays as it is\n")
    text = _banner(app_dir, port=2727)
    tail = text.split("Try it", 1)[1]
    assert "a note for the author" not in tail
    assert "  swaks --server 127.0.0.1:2727 --to hello@helpdesk.example.org --body 'costs $5'" in tail
    assert (f"  {command_path()} state --key x   # at {WORK}, mail in {WORK}/mail/inbox/new/, "
            "hosts helpdesk.example.org, port 2727") in tail
    assert "  $unknown stays as it is" in tail
    assert "no-such-address" not in tail  # the application's text replaces the generated commands


def test_command_path_is_the_absolute_script_next_to_this_python():
    path = command_path()
    assert path == shlex.quote(str(Path(sys.executable).absolute().parent / "lamsonfilter"))
    assert Path(shlex.split(path)[0]).is_absolute()


def test_demo_of_a_missing_application_is_one_line_and_leaves_no_work_directory(monkeypatch, tmp_path):
    import lamsonfilter.devtools.demo as demo

    made = []
    real = demo.new_workdir

    def spy():
        made.append(real())
        return made[-1]

    monkeypatch.setattr(demo, "new_workdir", spy)
    result = CliRunner().invoke(main, ["demo", "--app", str(tmp_path / "nowhere"), "--port", "1"])
    assert result.exit_code == 2
    assert result.output.strip() == f"lamsonfilter: {tmp_path / 'nowhere'}: no such application directory"
    assert len(made) == 1 and not made[0].exists()
