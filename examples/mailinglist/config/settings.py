"""Settings of the example mailing-list application.

Every name in capitals is a setting; the command line's options override
them (``--database``, ``--relay``).  See ``lamsonfilter.settings``.
"""

import re

NAME = "mailinglist"

# Domains this application owns: mail to an address here that no route
# accepts is refused at RCPT time with 550 5.1.1.
HOSTS = ["lists.example.org"]

# The lists that exist.  A list address is LIST@HOST, plus LIST-subscribe,
# LIST-unsubscribe, LIST-confirm-TOKEN and LIST-bounce-MEMBER.
LISTS = {
    "python": "Python discussion",
    "announce": "Announcements",
}

HANDLERS = ["mailinglist"]

ROUTE_DEFAULTS = {
    "list": "|".join(re.escape(name) for name in LISTS),
}

# Relative SQLite paths are relative to this application's directory.
DATABASE_URL = "sqlite:///var/state.db"

# Where the outbox (replies, list posts) is sent: Postfix's reinjection
# listener, which must not filter again.
RELAY = "127.0.0.1:10026"

TEMPLATES = ["app/templates"]

# At most 5 automatic replies per sender per hour.
REPLY_LIMIT = (5, 3600)

# How long a subscription confirmation is valid, in seconds.
CONFIRM_TTL = 3 * 24 * 3600

# Permanent bounces of list mail before a member is disabled.
BOUNCE_LIMIT = 3
