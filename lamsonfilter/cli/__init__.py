"""The ``lamsonfilter`` command.

    lamsonfilter test --app DIR [FILE|MAILDIR ...]   dry run: what would the app do?
    lamsonfilter routes --app DIR [--test ADDRESS]   the routes, and who gets ADDRESS
    lamsonfilter gen NAME                            a new application skeleton
    lamsonfilter db init --app DIR                   create the state schema
    lamsonfilter state list|show --app DIR ...       the state of keys (lamsonfilter.cli.state)

Every command that loads an application refuses bad configuration at once,
with a message naming the file and setting, and exits with status 2.
"""

from __future__ import annotations

import logging

import click

from .. import __version__
from .daemons import milter_cmd, smtpproxy_cmd
from .quarantine import quarantine_cmd
from .state import state_cmd
from .testcmd import test_cmd
from .tools import check_cmd, db_cmd, demo_cmd, gen_cmd, graph_cmd, routes_cmd, send_cmd

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
                 milter_cmd, smtpproxy_cmd, state_cmd, quarantine_cmd):
    main.add_command(_command)
