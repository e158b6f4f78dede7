#!/usr/bin/env python3
"""stateful_source.py - subscribe/confirm traffic for bench/stateful_bench.sh, in smtp-source's place.

bench/filter_bench.sh runs ``$BENCH_SOURCE -s SESSIONS -m N -l LEN -M HELO -f FROM -t TO -S SUBJ
HOST:PORT`` (smtp-source's options; others are ignored).  This program sends N messages over
SESSIONS parallel SMTP connections, in pairs, each pair from a sender of its own
(``b<run>x<k>@d<k>.bench.example``, a fresh conversation of the example list):

1. ``python-subscribe@lists.example.org``: START -> PENDING, a token, a confirmation request
   in the outbox (one message at the sink);
2. ``python-confirm-TOKEN@lists.example.org`` with the token the filter stored: PENDING ->
   MEMBER, a welcome in the outbox (one message at the sink).

So N messages in give N messages at the sink, as with Postfix alone (config ``a``), where the
same mail is relayed as it is.  The token is read from the application's state database
(``$LAMSONFILTER_DATABASE``, else the application's DATABASE_URL; the application is
``$BENCH_DIR/app``), the way a subscriber reads it from the request: polled every 5 ms, at most
``$BENCH_TOKEN_WAIT`` seconds (default 10) -- in milter mode it is committed before the 250,
in content-filter mode shortly after.  With Postfix alone (no ``smtpd_milters`` or
``content_filter`` in ``$BENCH_DIR/etc/main.cf``) there is no token to wait for: a random one
is used and the mail simply passes.

Exit status 0 when every message got a 250, 1 otherwise (as smtp-source).  Loopback only;
bounded: N messages, every wait with a time limit.
"""

from __future__ import annotations

import os
import secrets
import smtplib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

LIST, HOST = "python", "lists.example.org"


def parse(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {"-s": "1", "-m": "1", "-l": "500", "-M": "bench.localdomain", "-S": "bench"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-s", "-m", "-l", "-M", "-f", "-t", "-S", "-r", "-c"):
            opts[arg] = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
        elif arg.startswith("-"):
            i += 1  # flags such as -d (several messages per connection): every session here sends many
        else:
            opts["target"] = arg
            i += 1
    return opts


def main(argv: list[str]) -> int:
    opts = parse(argv)
    host, _, port = opts.get("target", "127.0.0.1:25").rpartition(":")
    sessions, total, length = int(opts["-s"]), int(opts["-m"]), int(opts["-l"])
    base = Path(os.environ.get("BENCH_DIR", "/tmp/lf-bench"))
    main_cf = (base / "etc" / "main.cf").read_text() if (base / "etc" / "main.cf").exists() else ""
    filtered = "smtpd_milters" in main_cf or "content_filter" in main_cf
    token_wait = float(os.environ.get("BENCH_TOKEN_WAIT", "10"))
    storage = None
    if filtered:
        from lamsonfilter.settings import load_settings, make_storage

        settings = load_settings(base / "app")
        url = os.environ.get("LAMSONFILTER_DATABASE") or settings["DATABASE_URL"]
        storage = make_storage(url, settings["APP_DIR"])
    run = secrets.token_hex(3)
    pad = "x" * 72 + "\n"
    body = (pad * max(1, length // len(pad)))[: max(1, length)]
    failures = 0
    lock = threading.Lock()

    def message(sender: str, rcpt: str) -> bytes:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = sender, rcpt, opts["-S"]
        msg["Message-ID"] = f"<{secrets.token_hex(12)}@bench.example>"
        msg.set_content(body)
        return msg.as_bytes()

    def token_of(sender: str) -> str:
        if storage is None:
            return secrets.token_hex(16)
        deadline = time.monotonic() + token_wait
        while time.monotonic() < deadline:  # bounded
            key = f"mailinglist:{LIST}:{sender}"  # the handler name, then its key (list, sender)
            found = [rec for k, rec in storage.scan(key, limit=1) if k == key]  # a read, no lock
            if found and found[0].data.get("token"):
                return str(found[0].data["token"])
            time.sleep(0.005)
        return secrets.token_hex(16)  # not there in time: the confirm is refused, counted as bad

    def session(pairs: range) -> None:
        nonlocal failures
        bad = 0
        try:
            with smtplib.SMTP(host, int(port), local_hostname=opts["-M"], timeout=120) as smtp:
                for k in pairs:
                    sender = f"b{run}x{k}@d{k}.bench.example"
                    for step in range(2):
                        if 2 * k + step >= total:
                            break
                        rcpt = (f"{LIST}-subscribe@{HOST}" if step == 0
                                else f"{LIST}-confirm-{token_of(sender)}@{HOST}")
                        try:
                            smtp.sendmail(sender, [rcpt], message(sender, rcpt))
                        except smtplib.SMTPException:
                            bad += 1
                            smtp.rset()
        except (smtplib.SMTPException, OSError):
            bad += 1
        with lock:
            failures += bad

    pairs = (total + 1) // 2
    chunks = [range(i, pairs, sessions) for i in range(min(sessions, pairs))]
    with ThreadPoolExecutor(max_workers=max(1, len(chunks))) as pool:
        list(pool.map(session, chunks))
    if storage is not None:
        storage.close()
    if failures:
        print(f"stateful_source: {failures} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
