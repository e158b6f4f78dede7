"""Integration-test rig: private Postfix instances and an SMTP capture server.

See :mod:`tests.rig.postfix` (the classes) and :mod:`tests.rig.fixtures` (pytest fixtures
``capture`` and ``postfix_factory``, enabled by ``pytest_plugins`` in the root conftest.py).
"""

from tests.rig.postfix import (
    CapturedMessage,
    CaptureServer,
    PrivatePostfix,
    RigUnavailable,
    by_subject,
    find_binary,
    free_port,
    missing_binaries,
    port_accepts,
    wait_for,
)

__all__ = [
    "CaptureServer",
    "CapturedMessage",
    "PrivatePostfix",
    "RigUnavailable",
    "by_subject",
    "find_binary",
    "free_port",
    "missing_binaries",
    "port_accepts",
    "wait_for",
]
