"""Repository-wide pytest configuration: loads the integration-test rig's fixtures
(``capture``, ``postfix_factory``) from tests/rig/fixtures.py for every test directory."""

pytest_plugins = ["tests.rig.fixtures"]
