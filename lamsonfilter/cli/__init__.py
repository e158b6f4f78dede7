"""The ``lamsonfilter`` command: one click group, its commands in four families.

    lamsonfilter milter | smtpproxy | deq ...        the daemons (`daemons`)
    lamsonfilter test --app DIR [FILE|MAILDIR ...]   the dry run (`testcmd`, `dryrun`)
    lamsonfilter routes | gen | check | graph | send | demo
                                                     the tools (`tools`)
    lamsonfilter db init|upgrade|status|revision|stamp
                                                     the database's schema, migrations (`db`)
    lamsonfilter state list|show ...                 the state of keys (`state`)
    lamsonfilter queue list|show|count|requeue|remove
                                                     the mail queue deq works through (`queue`)
    lamsonfilter outbox list|show|retry|drop         the outbox's waiting and failed messages (`outbox`)
    lamsonfilter quarantine list|show|release|delete the quarantine (`quarantine`)

The last three are the operator's commands: one family, one set of options,
``--json``, one-line errors and exit statuses (`opview`).

Every command that loads an application refuses bad configuration at once,
with one line naming the file and setting, and exits with status 2
(`common.fail`).  The console script is ``lamsonfilter = lamsonfilter.cli:main``;
``python -m lamsonfilter`` and ``python -m lamsonfilter.cli`` run the same group.
"""

from __future__ import annotations

import logging

import click

from .. import __version__
from .db import db_cmd
from .daemons import deq_cmd, milter_cmd, smtpproxy_cmd
from .outbox import outbox_cmd
from .quarantine import quarantine_cmd
from .queue import queue_cmd
from .state import state_cmd
from .testcmd import test_cmd
from .tools import check_cmd, demo_cmd, gen_cmd, graph_cmd, routes_cmd, send_cmd

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lamsonfilter")
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug).")
def main(verbose: int) -> None:
    """Run a Lamson-style mail application behind Postfix or Exim.

    Try an application with no server at all:

        lamsonfilter test --app examples/mailinglist < message.eml
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="lamsonfilter: %(levelname)s %(message)s")



for _command in (test_cmd, routes_cmd, gen_cmd, db_cmd, check_cmd, demo_cmd, graph_cmd, send_cmd,
                 milter_cmd, smtpproxy_cmd, deq_cmd, state_cmd, queue_cmd, outbox_cmd, quarantine_cmd):
    main.add_command(_command)
