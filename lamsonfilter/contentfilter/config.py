"""`ProxyConfig`: everything ``lamsonfilter smtpproxy`` is started with (checked by `server.check_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``lamsonfilter smtpproxy`` is started with (checked by `proxyserver.check_config`)."""

    app_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 10025)
    reinject: tuple[str, int] = ("127.0.0.1", 10026)
    lmtp: bool = False
    workers: int = 1
    database: str | None = None
    queue: str | None = None  # overrides the QUEUE setting (where ctx.defer() writes)
    allow_remote: bool = False
    max_size: int = 10_240_000
    deadline: float = 120.0
    quarantine: Path | None = None
    spool_dir: str | None = None
    threads: int = 8
    hostname: str = "lamsonfilter.localhost"
    policy: tuple[str, int] | None = None  # the RCPT-time policy listener (lamsonfilter.contentfilter.policy)
    postfix_config: Path | None = None  # checked at start-up: refuse a set-up where reinjected mail loops back

    @property
    def quarantine_path(self) -> Path:
        return self.quarantine or Path(self.app_dir).resolve() / "var" / "quarantine"

    @property
    def attempts_path(self) -> Path:
        """Where `lamsonfilter.daemon.poison.AttemptLog` counts failed attempts: next to the quarantine."""
        return self.quarantine_path.parent / "attempts"
