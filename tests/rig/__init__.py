"""Integration-test rig: private Postfix instances and an SMTP capture server.

See :mod:`tests.rig.postfix` (the classes) and :mod:`tests.rig.fixtures` (pytest fixtures
``capture`` and ``postfix_factory``, enabled by ``pytest_plugins`` in the root conftest.py).
"""

from tests.rig.postfix import *  # noqa: F401,F403 -- the same names, listed once in postfix.__all__
from tests.rig.postfix import __all__  # noqa: F401
