"""The state database the units use: `db init` finds it, the hints name it, its user can write it.

Issue 12 items 6 and 7, issue 14 item 11.  The writability tests run the real
commands as a dedicated non-root user (created here with ``useradd`` and
removed afterwards; they need root, as CI has).
"""

import os
import pwd
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.rig.fixtures import in_ci

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mailinglist"


def lf(*args: str, env: dict[str, str] | None = None, user: str | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`lamsonfilter ARGS` in a subprocess (as `user` with setpriv when given)."""
    argv = [sys.executable, "-m", "lamsonfilter", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LAMSONFILTER_")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})}, check=False,
                          cwd="/")


@pytest.fixture
def app_copy():
    """The example application in a directory every user can read (tmp_path is 0700)."""
    d = Path(f"/tmp/lf-dbsetup-{uuid.uuid4().hex[:8]}")
    shutil.copytree(APP, d / "app", ignore=shutil.ignore_patterns("var", "__pycache__", "*.db"))
    os.chmod(d, 0o755)
    yield d / "app"
    shutil.rmtree(d, ignore_errors=True)


def test_db_init_uses_lamsonfilter_database_like_the_daemons(app_copy):
    """The units set LAMSONFILTER_DATABASE; db init must initialise that database, not APP/var/state.db."""
    state = app_copy.parent / "state" / "state.db"
    state.parent.mkdir()
    url = f"sqlite:///{state}"
    r = lf("db", "init", "--app", str(app_copy), env={"LAMSONFILTER_DATABASE": url})
    assert r.returncode == 0, r.stderr
    assert state.exists() and not (app_copy / "var" / "state.db").exists()
    assert f"state schema ready in {state} ({url})" in r.stdout
    # check and the daemons read the same one: no APP010
    r = lf("check", "--app", str(app_copy), env={"LAMSONFILTER_DATABASE": url})
    assert "APP010" not in r.stdout, r.stdout


def test_db_init_prints_the_absolute_path_of_a_relative_url(app_copy):
    r = lf("db", "init", "--app", str(app_copy))
    assert r.returncode == 0, r.stderr
    full = app_copy / "var" / "state.db"
    assert full.exists()
    assert f"state schema ready in {full} (sqlite:///{full})" in r.stdout
    assert "sqlite:///var/state.db" not in r.stdout


def test_the_daemons_hint_names_the_database_given(app_copy):
    """Issue 12 item 6: following the hint must initialise the database the daemon was given."""
    pytest.importorskip("aiosmtpd")
    missing = app_copy.parent / "nowhere.db"
    url = f"sqlite:///{missing}"
    from tests.rig.postfix import free_port

    r = lf("smtpproxy", "--app", str(app_copy), "--listen", f"127.0.0.1:{free_port()}",
           "--quarantine", str(app_copy.parent / "q"), env={"LAMSONFILTER_DATABASE": url})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"db init --app {app_copy} --database {url}" in r.stderr, r.stderr
    # an existing file without the schema: the storage's own hint names it too
    missing.write_bytes(b"")
    r = lf("smtpproxy", "--app", str(app_copy), "--listen", f"127.0.0.1:{free_port()}",
           "--quarantine", str(app_copy.parent / "q"), "--database", url)
    assert r.returncode == 2 and f"--database {url}" in r.stderr, r.stderr
    # following it works
    hint = r.stderr.split("run `", 1)[1].split("`", 1)[0]
    assert hint.startswith("lamsonfilter db init ")
    assert lf(*hint.split()[1:]).returncode == 0


# ------------------------------------------------------------------ writability (item 7)
@pytest.fixture
def service_user():
    """A dedicated non-root user, like the units' lamsonfilter (created here, removed afterwards)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        if in_ci():
            pytest.fail("root, useradd and setpriv are needed under CI", pytrace=False)
        pytest.skip("needs root (useradd, setpriv)")
    name = f"lfdb{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=60)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60, check=False)


def _state_dir(app_copy: Path, user: str) -> Path:
    d = app_copy.parent / "lib"
    d.mkdir()
    entry = pwd.getpwnam(user)
    os.chown(d, entry.pw_uid, entry.pw_gid)
    os.chmod(d, 0o750)
    return d


def test_a_database_its_user_cannot_write_stops_the_daemon_and_is_app011(app_copy, service_user):
    pytest.importorskip("aiosmtpd")
    from tests.rig.postfix import free_port

    state = _state_dir(app_copy, service_user) / "state.db"
    url = f"sqlite:///{state}"
    r = lf("db", "init", "--app", str(app_copy), "--database", url)  # as root: the natural thing
    assert r.returncode == 0
    assert "belongs to root" in r.stderr and "--owner" in r.stderr  # db init warns
    # the daemon, as the service's user, refuses to start: exit 2, one line naming the file and the user
    daemon = ("smtpproxy", "--app", str(app_copy), "--listen", f"127.0.0.1:{free_port()}",
              "--reinject", f"127.0.0.1:{free_port()}", "--quarantine", str(state.parent / "q"), "--database", url)
    r = lf(*daemon, user=service_user, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state) in lines[0] and f"user {service_user}" in lines[0], r.stderr
    # check (as root) says the same for the service's user
    r = lf("check", "--app", str(app_copy), "--database", url, "--user", service_user)
    assert r.returncode == 1 and "APP011" in r.stdout and str(state) in r.stdout and service_user in r.stdout
    # chown of the file alone is not enough while a root-owned -wal/-shm lies next to it
    entry = pwd.getpwnam(service_user)
    os.chown(state, entry.pw_uid, entry.pw_gid)
    wal = Path(f"{state}-wal")
    wal.write_bytes(b"")
    r = lf(*daemon, user=service_user, timeout=60)
    assert r.returncode == 2 and f"{state}-wal" in r.stderr, r.stderr
    r = lf("check", "--app", str(app_copy), "--database", url, "--user", service_user)
    assert "APP011" in r.stdout and f"{state}-wal" in r.stdout
    wal.unlink(missing_ok=True)  # check, as root, opened the database: SQLite removed it
    # db init --owner hands everything to the user: no finding any more
    r = lf("db", "init", "--app", str(app_copy), "--database", url, "--owner", service_user)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert state.stat().st_uid == entry.pw_uid
    r = lf("check", "--app", str(app_copy), "--database", url, "--user", service_user)
    assert "APP011" not in r.stdout, r.stdout


def test_the_milter_refuses_an_unwritable_database_too(app_copy, service_user):
    pytest.importorskip("Milter")
    state = _state_dir(app_copy, service_user) / "state.db"
    url = f"sqlite:///{state}"
    assert lf("db", "init", "--app", str(app_copy), "--database", url).returncode == 0
    r = lf("milter", "--app", str(app_copy), "--database", url, "--socket",
           f"unix:{state.parent}/milter.sock", "--socket-group", "", user=service_user, timeout=60)
    assert r.returncode == 2 and str(state) in r.stderr and service_user in r.stderr, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_check_as_root_judges_for_the_owner_of_the_state_directory(app_copy, service_user):
    """The issue's case: `db init` and `check` both run as root, the units' directory belongs to the user."""
    state = _state_dir(app_copy, service_user) / "state.db"
    url = f"sqlite:///{state}"
    assert lf("db", "init", "--app", str(app_copy), "--database", url).returncode == 0
    r = lf("check", "--app", str(app_copy), "--database", url)
    assert r.returncode == 1 and "APP011" in r.stdout and f"user {service_user}" in r.stdout, r.stdout
