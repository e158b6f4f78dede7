#!/usr/bin/env python3
"""The floor of pymilter: milters that do (almost) nothing (bench configs ``tu`` and ``tc``).

    trivial_milter.py unix:/path/milter.sock            # tu
    trivial_milter.py unix:/path/milter.sock --connect  # tc

``tu`` receives header and body (as any milter that reads mail must),
keeps them in memory, and at end of message adds one header and accepts.
``tc`` answers ACCEPT to the connect event: Postfix only connects,
negotiates and says goodbye -- what any pymilter milter costs per SMTP
session before it does anything.  No application, no log line.
milter_bench.sh runs them in the same rounds as lamsonfilter, so that
"what pymilter itself costs" and "what lamsonfilter adds" can be told
apart (after bench/anchor/anchor_milter.py).  A measurement tool, not
product code.
"""

import os
import sys

import Milter


class TrivialMilter(Milter.Base):  # subclass Base directly: pymilter caches negotiation per class
    def envfrom(self, mailfrom, *params):
        self.chunks = []
        return Milter.CONTINUE

    def header(self, name, value):
        self.chunks.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        return Milter.CONTINUE

    def eoh(self):
        self.chunks.append(b"\r\n")
        return Milter.CONTINUE

    def body(self, chunk):
        self.chunks.append(chunk)
        return Milter.CONTINUE

    def eom(self):
        size = sum(len(c) for c in self.chunks)
        self.chunks = []
        self.addheader("X-Trivial-Milter", str(size))
        return Milter.ACCEPT


class ConnectOnlyMilter(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.ACCEPT  # nothing more for this SMTP session


if __name__ == "__main__":
    os.umask(0)  # Postfix's smtpd (user postfix) must connect to the socket
    Milter.factory = ConnectOnlyMilter if "--connect" in sys.argv else TrivialMilter
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("trivial", sys.argv[1] if len(sys.argv) > 1 else "inet:8894@127.0.0.1", timeout=60)
