"""The mail queue that ``lamsonfilter deq`` works through (a Maildir with claims), and
durable Maildir writes shared with the quarantine and the poison counters."""
