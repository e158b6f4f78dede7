"""Settings of the {{NAME}} application (see lamsonfilter.settings for every name)."""

NAME = "{{NAME}}"

# Domains this application owns: an address here that no route accepts is
# refused at RCPT time with 550 5.1.1.  Mail for other domains passes untouched.
HOSTS = ["{{HOST}}"]

# Modules in app/handlers/ to load; each defines handler = Handler(...).
HANDLERS = ["{{NAME}}"]

# State store: SQLite next to the application by default.  For several
# filter hosts sharing state: "postgresql://user@dbhost/lamsonfilter".
DATABASE_URL = "sqlite:///var/state.db"

# Where replies and new messages are sent (Postfix's reinjection listener).
RELAY = "127.0.0.1:10026"

TEMPLATES = ["app/templates"]

# Automatic replies (ctx.reply) per handler and sender: a handler declared with
# Handler(..., replies="service") -- the default -- may send 10 an hour, one with
# replies="responder" one per 7 days (RFC 3834).  To change them:
# REPLY_LIMIT = {"service": (5, 3600)}      # or {"{{NAME}}": (5, 3600)}, or (5, 3600) for all
