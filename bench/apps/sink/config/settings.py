"""The queue bench's application: one stateless route that does nothing (bench/deq_bench.py)."""

NAME = "sink"
HOSTS = ["lists.example.org"]
HANDLERS = ["sink"]
DATABASE_URL = "memory:"
TEMPLATES = []
