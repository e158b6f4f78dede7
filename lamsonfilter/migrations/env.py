"""Alembic's environment script for every lamsonfilter migration (framework and application).

Alembic runs this file for ``lamsonfilter db init|upgrade|revision|status``;
everything it needs (the connection, the version table, the models) is
handed over in the `alembic.config.Config` that
`lamsonfilter.store.migrate` builds in code, so no ``alembic.ini`` exists.
"""

from lamsonfilter.store.migrate import run_env

run_env()
