"""lamsonfilter check: application findings and Postfix findings, each with a stable ID.

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rig.checks import (
    APP,
    GOOD_MAIN,
    GOOD_MASTER,
    ids,
    invoke,
    need_postconf,
    write_postfix,
)
from tests.rig.fixtures import require_module


def test_example_app_checks_clean_apart_from_the_database(tmp_path):
    r = invoke("check", "--app", APP, "--database", f"sqlite:///{tmp_path}/s.db")
    assert ids(r.output) == ["APP010"] and "lamsonfilter db init" in r.output
    invoke("db", "init", "--app", APP, "--database", f"sqlite:///{tmp_path}/s.db")
    r = invoke("check", "--app", APP, "--database", f"sqlite:///{tmp_path}/s.db")
    assert r.exit_code == 0 and r.output.strip() == "0 error(s), 0 warning(s)"


def test_app_findings_unreachable_state_shadowed_route_missing_template(tmp_path):
    app = tmp_path / "x"
    invoke("gen", "x", "--dest", app)
    (app / "app/handlers/x.py").write_text(
        "from lamsonfilter import Handler\nhandler = Handler('x')\n"
        "@handler.route('(anything)@(host)')\n"
        "def START(ctx, host):\n    ctx.reply('nosuch.msg')\n\n"
        "@handler.route('hello@(host)')\n"
        "@handler.state\ndef LONELY(ctx, host):\n    pass\n"
    )
    r = invoke("check", "--app", app, "--database", "memory:")
    assert r.exit_code == 1
    assert ids(r.output) == ["APP002", "APP003", "APP004"]
    assert "state LONELY is unreachable" in r.output
    assert "x.LONELY (hello@(host)) is shadowed by the earlier route x.START" in r.output
    assert "'nosuch.msg'" in r.output


def test_broken_app_is_app001(tmp_path):
    app = tmp_path / "x"
    invoke("gen", "x", "--dest", app)
    (app / "config/settings.py").write_text("HANDLERS = ['missing']\n")
    r = invoke("check", "--app", app)
    assert r.exit_code == 1 and ids(r.output) == ["APP001"]


def test_good_content_filter_setup_has_no_postfix_findings(tmp_path):
    need_postconf()
    pf = write_postfix(tmp_path / "pf", GOOD_MAIN, GOOD_MASTER)
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf)
    assert [i for i in ids(r.output) if i.startswith("PF")] == [], r.output


def test_missing_content_filter_override_on_reinjection_listener_is_pf111(tmp_path):
    need_postconf()
    broken = GOOD_MASTER.replace("    -o content_filter=\n", "")
    pf = write_postfix(tmp_path / "pf", GOOD_MAIN, broken)
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf)
    assert r.exit_code == 1
    assert "PF111" in ids(r.output)
    assert "endless loop" in r.output and "-o content_filter=" in r.output


def test_other_postfix_mistakes(tmp_path):
    need_postconf()
    master = GOOD_MASTER.replace("    -o smtp_send_xforward_command=yes\n", "").replace(",no_milters", "")
    main_cf = ("content_filter = lamsonfilter:[127.0.0.1]:10025\n"
               "smtpd_milters = inet:127.0.0.1:8891\nmilter_default_action = accept\nsoft_bounce = yes\n")
    pf = write_postfix(tmp_path / "pf", main_cf, master)
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf)
    assert {"PF003", "PF102", "PF112", "PF120", "PF201"} <= set(ids(r.output))
    pf2 = write_postfix(tmp_path / "pf2", "", "smtp inet n - n - - smtpd\n")
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf2)
    assert {"PF002", "PF110"} <= set(ids(r.output))
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", tmp_path / "nothing")
    assert "PF001" in ids(r.output)


def test_milter_socket_must_match_smtpd_milters(tmp_path):
    need_postconf()
    master = GOOD_MASTER.replace("lamsonfilter unix", "x unix")
    main_cf = ("smtpd_milters = { unix:/lamsonfilter/milter.sock, default_action=tempfail }\n"
               "milter_default_action = tempfail\n")
    pf = write_postfix(tmp_path / "pf", main_cf, master)
    ok = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf,
                "--milter-socket", "unix:/var/spool/postfix/lamsonfilter/milter.sock")
    assert "PF203" not in ids(ok.output), ok.output
    bad = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf,
                 "--milter-socket", "inet:8891@127.0.0.1")
    assert "PF203" in ids(bad.output) and bad.exit_code == 1


def _example_copy(tmp_path, *edits):
    app = tmp_path / "ml"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("var", "__pycache__"))
    handler = app / "app/handlers/mailinglist.py"
    source = handler.read_text()
    for old, new in edits:
        assert old in source
        source = source.replace(old, new, 1)
    handler.write_text(source)
    return app


def test_a_route_capture_typo_is_refused_by_routes_and_check(tmp_path):
    app = _example_copy(tmp_path, ('"(list)-subscribe@(host)"', '"(lsit)-subscribe@(host)"'))
    r = invoke("routes", "--app", app)
    assert r.exit_code == 2
    assert "(lsit)-subscribe@(host)" in r.output and "does not capture 'list'" in r.output
    assert "Traceback" not in r.output
    r = invoke("check", "--app", app, "--database", "memory:")
    assert r.exit_code == 1 and ids(r.output) == ["APP001"] and "'list'" in r.output


def test_a_returned_name_that_is_no_state_is_app006(tmp_path):
    app = _example_copy(
        tmp_path,
        ("        return MEMBER\n", "        return MEMBERX\n"),       # NameError at run time
        ("    return START\n", '    return "STRAT"\n'),              # in the helper _confirm_leaving
    )
    r = invoke("check", "--app", app, "--database", "memory:")
    assert r.exit_code == 1 and ids(r.output) == ["APP006"]
    lines = [l for l in r.output.splitlines() if l.startswith("APP006")]
    pending = next(l for l in lines if "state PENDING" in l)
    assert "MEMBERX" in pending
    assert any("state MEMBER " in l and "'STRAT'" in l for l in lines)  # through _confirm_leaving
    assert any("state DISABLED " in l and "'STRAT'" in l for l in lines)
    assert not any("MEMBERX" in l for l in lines if "state PENDING" not in l)


MILTER_MASTER = GOOD_MASTER.replace("lamsonfilter unix", "x unix")
OURS = "unix:/lamsonfilter/milter.sock"
SPOOL_SOCKET = "unix:/var/spool/postfix/lamsonfilter/milter.sock"


@pytest.mark.parametrize(
    "milters, global_action, expected, fix",
    [
        # OpenDKIM may fail open; lamsonfilter's own entry says tempfail: nothing wrong
        (f"{{ inet:127.0.0.1:8891, default_action=accept }}, {{ {OURS}, default_action=tempfail }}",
         "tempfail", set(), None),
        (f"{{ inet:127.0.0.1:8891, default_action=accept }} {OURS}", "tempfail", set(), None),
        # lamsonfilter's entry fails open: the fix names that entry
        (f"inet:127.0.0.1:8891, {{ {OURS}, default_action=accept }}", "tempfail", {"PF201"},
         f"default_action=tempfail in its {{ {OURS}, ... }} entry"),
        # the global default applies to lamsonfilter's entry when it has no option of its own
        (f"{{ inet:127.0.0.1:8891, default_action=tempfail }}, {OURS}", "accept", {"PF201"},
         "set milter_default_action = tempfail"),
        (f"inet:127.0.0.1:8891, {{ {OURS}, default_action=tempfail }}", "accept", set(), None),
    ],
)
def test_pf201_judges_only_lamsonfilters_milter_entry(tmp_path, milters, global_action, expected, fix):
    need_postconf()
    main_cf = (f"smtpd_milters = {milters}\nnon_smtpd_milters = {OURS}\nmilter_default_action = {global_action}\n"
               "relay_domains = lists.example.org\n")
    pf = write_postfix(tmp_path / "pf", main_cf, MILTER_MASTER)
    r = invoke("check", "--app", APP, "--database", "memory:", "--postfix-config", pf,
               "--milter-socket", SPOOL_SOCKET)
    found = {i for i in ids(r.output) if i.startswith("PF2")}
    assert found == expected, r.output
    assert r.exit_code == (1 if expected else 0), r.output
    if fix:
        assert fix in r.output


def test_app010_says_when_the_database_cannot_be_reached(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = invoke("check", "--app", APP, "--database", f"postgresql://127.0.0.1:{port}/test")
    assert r.exit_code == 1 and ids(r.output) == ["APP010"]
    assert "cannot connect to the state database" in r.output and "refused" in r.output.lower()
    assert "db init" not in r.output


def test_check_leaves_no_empty_state_database_behind(tmp_path):
    app = _example_copy(tmp_path)
    r = invoke("check", "--app", app)
    assert r.exit_code == 1 and ids(r.output) == ["APP010"]
    assert "does not exist yet" in r.output and f"db init --app {app}" in r.output
    assert not (app / "var" / "state.db").exists()
    r = invoke("test", "--app", app, app / "samples" / "01-subscribe.eml")
    assert r.exit_code == 0 and "does not exist yet" in r.output
    (app / "var").mkdir()
    (app / "var" / "state.db").write_bytes(b"")  # an empty file: no schema
    r = invoke("test", "--app", app, app / "samples" / "01-subscribe.eml")
    assert "has no lamsonfilter schema" in r.output and "--app DIR" not in r.output
    assert f"--app {app}" in r.output


def test_smtpproxy_refuses_to_start_on_a_looping_postfix_configuration(tmp_path):
    """L1: with --postfix-config the daemon runs the same checks and will not start on an error."""
    require_module("aiosmtpd")
    need_postconf()
    from lamsonfilter.contentfilter.server import build_runtime
    from lamsonfilter.smtpproxy import ProxyConfig

    looping = write_postfix(tmp_path / "loop", GOOD_MAIN, GOOD_MASTER.replace("    -o content_filter=\n", ""))
    from tests.rig.postfix import free_port

    proc = subprocess.run(  # a subprocess with a timeout: should the check not run, it would serve
        [sys.executable, "-m", "lamsonfilter", "smtpproxy", "--app", str(APP), "--database", "memory:",
         "--listen", f"127.0.0.1:{free_port()}", "--quarantine", str(tmp_path / "q"),
         "--postfix-config", str(looping)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PF111" in proc.stderr and "not safe to run with" in proc.stderr
    good = write_postfix(tmp_path / "good", GOOD_MAIN, GOOD_MASTER)
    runtime = build_runtime(ProxyConfig(app_dir=Path(APP), database="memory:", quarantine=tmp_path / "q",
                                        postfix_config=good))
    runtime.stop()


def test_an_outbox_journal_the_service_cannot_write_is_app012(tmp_path):
    """The daemons refuse to start when they cannot make their sent journal file (OUTBOX_JOURNAL):
    check says so beforehand, for the service's user."""
    app = tmp_path / "x"
    invoke("gen", "x", "--dest", app)
    journal = tmp_path / "journal"
    journal.mkdir(mode=0o755)  # this user's: nobody may not write it
    with open(app / "config" / "settings.py", "a") as f:
        f.write(f"OUTBOX_JOURNAL = {str(journal / 'sent')!r}\n")
    url = f"sqlite:///{tmp_path}/s.db"
    invoke("db", "init", "--app", app, "--database", url)
    r = invoke("check", "--app", app, "--database", url, "--user", "nobody")
    assert r.exit_code == 1 and "APP012" in ids(r.output), r.output
    assert (f"the outbox's sent journal directory {journal / 'sent'} (OUTBOX_JOURNAL) cannot be made or written: "
            f"{journal} (owner") in r.output and f"fix: chown nobody {journal}" in r.output
    r = invoke("check", "--app", app, "--database", url)  # this user may write it
    assert "APP012" not in ids(r.output), r.output
