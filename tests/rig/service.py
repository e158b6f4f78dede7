"""The daemons under a service manager: an application with the ``svc`` handler
(tests/fixtures/handlers/svc.py) and a NOTIFY_SOCKET read as systemd would.
"""

from __future__ import annotations

import socket
from pathlib import Path

from lamsonfilter.settings import make_storage
from tests.rig.postfix import wait_for

__all__ = ["HANDLER", "Notifications", "ROOT", "make_app"]

ROOT = Path(__file__).resolve().parents[2]

#: The ``svc`` handler's source (the tests write changed copies of it to test reloads).
HANDLER = (ROOT / "tests" / "fixtures" / "handlers" / "svc.py").read_text()


def make_app(tmp: Path) -> Path:
    """A copy of the example mailing list plus ``svc``, its SQLite schema created."""
    import shutil

    app = tmp / "app"
    shutil.copytree(ROOT / "examples" / "mailinglist", app, ignore=shutil.ignore_patterns("var", "__pycache__", "tests"))
    (app / "app" / "handlers" / "svc.py").write_text(HANDLER)
    settings = app / "config" / "settings.py"
    text = settings.read_text().replace('HANDLERS = ["mailinglist"]', 'HANDLERS = ["mailinglist", "svc"]')
    settings.write_text(text + f"\nFLAG_DIR = {str(tmp)!r}\n")
    storage = make_storage("sqlite:///var/state.db", app)
    storage.create_schema()
    storage.close()
    return app


class Notifications:
    """A NOTIFY_SOCKET the test reads, as systemd would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(1.0)
        self.seen: list[str] = []

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        def got() -> str:
            for m in self.seen:
                if text in m:
                    self.seen.remove(m)
                    return m
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
            return ""

        return wait_for(got, timeout, interval=0.0, message=f"{text!r} on the notify socket")

    def close(self) -> None:
        self.sock.close()
