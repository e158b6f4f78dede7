"""Settings of the example help desk.

Every name in capitals is a setting; the command line's options override
them (``--database``, ``--relay``).  See ``lamsonfilter.settings``.  The
help desk keeps its tickets in its own tables (``app/models.py``), so its
database must be a SQL one: create it with ``lamsonfilter db init --app
examples/helpdesk``.
"""

NAME = "helpdesk"

# Domains this application owns: mail to an address here that no route
# accepts is refused at RCPT time with 550 5.1.1.
HOSTS = ["support.example.org"]

HANDLERS = ["helpdesk"]

# Relative SQLite paths are relative to this application's directory.
# Several filter hosts share one PostgreSQL instead: ticket numbers come
# from the database, so they stay unique across hosts.
DATABASE_URL = "sqlite:///var/helpdesk.db"

# Where the outbox (replies, answers to requesters) is sent: Postfix's
# reinjection listener, which must not filter again.
RELAY = "127.0.0.1:10026"

TEMPLATES = ["app/templates"]

# The people who answer tickets.  Besides a ticket's requester, only they
# may write to support+ticket-N@ and close tickets; each new ticket and
# each reply of a requester is sent on to them, and what they write to a
# ticket is sent on to its requester.
STAFF = ["staff@example.com"]
