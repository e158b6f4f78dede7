"""Runtime: start-up checks, the per-message log line, reload that keeps broken code out."""

import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamsonfilter.app import StartupError
from lamsonfilter.cli import main
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.mail import MailRequest
from lamsonfilter.testing import make_message

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def app_dir(tmp_path):
    d = tmp_path / "mailinglist"
    shutil.copytree(ROOT / "examples" / "mailinglist", d, ignore=shutil.ignore_patterns("var", "__pycache__"))
    return d


def req(to):
    raw = make_message("alice@example.com", to)
    return MailRequest.from_bytes(raw, sender="alice@example.com", recipients=[to], queue_id="7QID")


def test_refuses_a_database_without_schema_naming_the_command(app_dir):
    with pytest.raises(StartupError, match=rf"run `lamsonfilter db init --app {app_dir}`"):
        Runtime.from_directory(app_dir)


def test_one_log_line_per_message_with_queue_id_routes_and_decision(app_dir, caplog):
    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    rt = Runtime.from_directory(app_dir)
    with caplog.at_level(logging.INFO, logger="lamsonfilter"):
        d = rt.process(req("help@lists.example.org"), transport="test")
    lines = [r for r in caplog.records if r.name == "lamsonfilter"]
    assert len(lines) == 1
    msg = lines[0].getMessage()
    assert "queue_id=7QID" in msg and "routes=mailinglist.help" in msg and "decision=drop" in msg
    assert lines[0].QUEUE_ID == "7QID" and lines[0].DECISION == "drop"  # journald fields
    assert len(d.outbox) == 1
    # the reply was committed to the outbox, waiting for the worker
    assert len(rt.app.storage.pending_outbox()) == 1
    rt.stop()


def test_reload_swaps_in_new_code_and_keeps_old_code_when_broken(app_dir):
    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    rt = Runtime.from_directory(app_dir)
    templates = app_dir / "app" / "templates" / "help.msg"
    templates.write_text(templates.read_text().replace("This is the list server", "Version two of the server"))
    handler = app_dir / "app" / "handlers" / "mailinglist.py"
    source = handler.read_text()
    assert rt.reload() is None
    d = rt.process(req("help@lists.example.org"))
    assert b"Version two of the server" in d.outbox[0].raw
    handler.write_text(source + "\ndef broken(:\n")
    why = rt.reload()
    assert why is not None and "SyntaxError" in why
    d = rt.process(req("python-info@lists.example.org"))
    assert not d.is_tempfail and b"Version two of the server" in d.outbox[0].raw  # old code still runs
    rt.stop()


def test_metrics_endpoint_counts_messages_by_route_and_decision(app_dir):
    import urllib.request

    from tests.rig.postfix import free_port

    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    rt = Runtime.from_directory(app_dir)
    port = free_port()
    rt.serve_metrics("127.0.0.1", port)
    try:
        rt.process(req("help@lists.example.org"))
        rt.process(req("nosuch@lists.example.org"))
        rt.process(req("friend@elsewhere.example"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        rt.stop()
    assert 'lamsonfilter_messages_total{decision="drop"} 1.0' in text
    assert 'lamsonfilter_messages_total{decision="reject"} 1.0' in text
    assert 'lamsonfilter_recipients_total{action="drop",route="mailinglist.help"} 1.0' in text
    assert 'lamsonfilter_recipients_total{action="deliver",route="none"} 1.0' in text
    assert "lamsonfilter_processing_seconds_count 3.0" in text
    assert "lamsonfilter_outbox_pending 1.0" in text  # the help reply, committed, no relay running


def test_metrics_refuse_a_public_address(app_dir):
    from lamsonfilter.daemon.metrics import MetricsError

    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    rt = Runtime.from_directory(app_dir)
    with pytest.raises(MetricsError, match="not loopback"):
        rt.serve_metrics("0.0.0.0", 9)
    rt.stop()


def test_metrics_setting_starts_the_endpoint_with_the_daemon(app_dir):
    import urllib.request

    from tests.rig.postfix import free_port

    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    port = free_port()
    rt = Runtime.from_directory(app_dir, {"METRICS": f"127.0.0.1:{port}"})
    rt.start()
    try:
        rt.process(req("help@lists.example.org"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert 'lamsonfilter_messages_total{decision="drop"} 1.0' in resp.read().decode()
    finally:
        rt.stop()


def test_release_free_memory_returns_the_heaps_free_pages(tmp_path):
    """The resident size falls when free memory inside the C heap is given back: 80 MB of 4 kB
    buffers, all freed but every 50th (so the heap cannot simply shrink from its top), stay resident
    until `release_free_memory` runs (a subprocess: its heap is its own)."""
    import subprocess
    import sys

    probe = (
        "import re\n"
        "from lamsonfilter.daemon.runtime import release_free_memory\n"
        "def rss():\n"
        "    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "bufs = [bytes(4096) + bytes([i % 256]) for i in range(20000)]\n"
        "kept = bufs[::50] + [bufs[-1]]\n"
        "del bufs\n"
        "before = rss()\n"
        "assert release_free_memory()\n"
        "print(before, rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 40_000, (before, after)  # kB: most of the 80 MB went back


def test_the_runtime_releases_free_memory_every_trim_every_messages(app_dir, monkeypatch):
    import lamsonfilter.daemon.runtime as runtime_mod

    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    calls = []
    monkeypatch.setattr(runtime_mod, "TRIM_EVERY", 3)
    monkeypatch.setattr(runtime_mod, "release_free_memory", lambda: calls.append(1) or True)
    rt = Runtime.from_directory(app_dir)
    for _ in range(7):
        rt.process(req("friend@elsewhere.example"))
    rt.stop()
    assert len(calls) == 2  # after the 3rd and the 6th message


def test_the_outbox_lease_setting_reaches_the_outbox_worker(app_dir):
    CliRunner().invoke(main, ["db", "init", "--app", str(app_dir)], catch_exceptions=False)
    with open(app_dir / "config" / "settings.py", "a") as f:
        f.write("\nOUTBOX_LEASE = 12\n")
    rt = Runtime.from_directory(app_dir)
    try:
        assert rt.worker is not None and rt.worker.lease == 12.0
    finally:
        rt.stop()
    rt = Runtime.from_directory(app_dir, {"OUTBOX_LEASE": 45})
    try:
        assert rt.worker is not None and rt.worker.lease == 45.0
    finally:
        rt.stop()


@pytest.mark.parametrize("value", ["0", "-5", '"300"', "True", "float('inf')"])
def test_a_bad_outbox_lease_is_refused_at_start_up_with_one_line(app_dir, value):
    with open(app_dir / "config" / "settings.py", "a") as f:
        f.write(f"\nOUTBOX_LEASE = {value}\n")
    r = CliRunner().invoke(main, ["routes", "--app", str(app_dir)])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "OUTBOX_LEASE must be a positive number of seconds" in r.output
