"""The content filter's internals: everything ``lamsonfilter smtpproxy`` needs besides the core.

`lamsonfilter.smtpproxy` is the entry module (the transport); the modules
here are its rooms: the per-message work (`handler`: MAIL/RCPT, then
MailRequest -> `Runtime.process` -> reinjection, quarantine, the reply),
what it is started with (`config`), the SMTP/LMTP session (`session`), the
server, its workers and start-up checks (`server`), reading DATA to a spool
file (`spool`), the table from a `Decision` to reinjection and a reply
(`plan`), the SMTP client to Postfix's reinjection listener (`reinjector`),
the quarantine (`quarantine`), the loop trace field (`looptrace`), Postfix's
policy delegation server (`policy`) and reading Postfix's own settings
(`postfix`).
"""
