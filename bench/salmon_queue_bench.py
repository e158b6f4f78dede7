"""Salmon's QueueReceiver on N queued messages, empty stateless handler: the anchor of bench/deq_bench.py.

Copied from the issue's anchor harness for a queue worker (the project's shared bench
folder, salmon/queue_bench.py, 2026-12-06), unchanged but for this docstring and the
CPU time of the drain (``time.process_time``) in the last line.  It runs in a
scratch virtualenv with salmon-mail 3.3.0 (GPLv3, https://github.com/moggers87/salmon), which
bench/deq_bench.py makes; nothing of Salmon is part of lamsonfilter.

    /tmp/salmon-venv/bin/python bench/salmon_queue_bench.py 1000 1   # N messages, worker threads
"""
import os
import shutil
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
WORKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1

work = tempfile.mkdtemp(prefix="salmon-bench-")
os.makedirs(os.path.join(work, "benchapp", "handlers"))
for d in ("benchapp", "benchapp/handlers"):
    open(os.path.join(work, d, "__init__.py"), "w").close()
with open(os.path.join(work, "benchapp", "handlers", "sink.py"), "w") as f:
    f.write(
        "from salmon.routing import route, stateless, nolocking\n"
        "COUNT = [0]\n"
        "@route('(address)@(host)', address='.+', host='.+')\n"
        "@stateless\n"
        "@nolocking\n"
        "def START(message, address=None, host=None):\n"
        "    COUNT[0] += 1\n"
    )
sys.path.insert(0, work)

from salmon import queue, routing, server  # noqa: E402

routing.Router.load(["benchapp.handlers.sink"])
routing.Router.RELOAD = False
import benchapp.handlers.sink as sink  # noqa: E402

qdir = os.path.join(work, "queue")
q = queue.Queue(qdir)
body = "x" * 2000
for i in range(N):
    q.push(f"From: a@example.com\r\nTo: list{i}@lists.example.org\r\nSubject: m{i}\r\n"
           f"Message-ID: <{i}@bench.example>\r\n\r\n{body}\r\n")

start = time.perf_counter()
cpu = time.process_time()
server.QueueReceiver(qdir, sleep=0, workers=WORKERS).start(one_shot=True)
took = time.perf_counter() - start
cpu = time.process_time() - cpu
print(f"salmon QueueReceiver, {WORKERS} worker(s): {N} queued, {sink.COUNT[0]} handled "
      f"in {took:.2f} s = {N / took:.0f} msg/s, cpu {cpu * 1000 / N:.3f} ms/msg")
shutil.rmtree(work, ignore_errors=True)
