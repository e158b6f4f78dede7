# lamsonfilter developer entry points.  `make test` is what CI (.ci/run) runs.
VENV := .venv
PYTEST_ARGS ?=

.PHONY: bootstrap bootstrap-run test run dry-run check soak twohost deqrel bench-deq

# everything, the test toolchain included (mypy, hypothesis, atheris, docutils, ruff, pytest)
bootstrap:
	@bash scripts/bootstrap.sh test

# only what running needs (pymilter, aiosmtpd, Postfix, swaks); a line per step
bootstrap-run:
	@bash scripts/bootstrap.sh run

# pytest exit status is passed on unchanged (5 = no tests collected is a failure too)
test: bootstrap
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# the example mailing list behind a private Postfix on loopback (MODE=content-filter for
# the after-queue set-up; APP=examples/helpdesk for the other example); Ctrl-C stops it and
# everything it started.  `make dry-run` needs no Postfix at all.
MODE ?= milter
APP ?= examples/mailinglist
run: bootstrap-run
	$(VENV)/bin/lamsonfilter demo --app $(APP) --mode $(MODE)

dry-run: bootstrap-run
	$(VENV)/bin/lamsonfilter test --app $(APP) $(APP)/samples/

check: bootstrap
	$(VENV)/bin/mypy --explicit-package-bases lamsonfilter tests/rig

# the O2 soak with random SIGKILLs of the filter (tests/reliability/soak.py), bounded by
# MINUTES; MODE=smtpproxy (or content-filter) or milter; e.g. SOAK_ARGS="--seed 7 --kill-every 120".
# Exit status 1 when an invariant breaks; the summary is also appended to $LF_RELIABILITY_FIGURES.
MINUTES ?= 60
SOAK_ARGS ?=
soak: bootstrap
	$(VENV)/bin/python -m tests.reliability.soak --mode $(MODE) --minutes $(MINUTES) $(SOAK_ARGS)

# issue 16: the example list through two filter hosts on one PostgreSQL database at full size
# (200 subscribers, 50 posts; the default suite runs 40 and 10), every pairing of modes,
# with and without SIGKILLs (tests/integration/test_two_hosts.py).
twohost: bootstrap
	LF_TWOHOST_FULL=1 $(VENV)/bin/python -m pytest -p no:cacheprovider -s tests/integration/test_two_hosts.py

# issue 17: `lamsonfilter deq` killed (kill -9) at seeded random points while draining 2,000 messages of
# the example list (12 kills), two deq processes on 2,000 messages, the poison message
# (tests/reliability/test_deq_faults.py; the default suite runs 300 messages and 10 kills).
# DEQ_SEED picks other kill points.
DEQ_SEED ?= 17
deqrel: bootstrap
	LF_DEQ_FULL=1 LF_DEQ_SEED=$(DEQ_SEED) $(VENV)/bin/python -m pytest -p no:cacheprovider -s tests/reliability/test_deq_faults.py

# issue 17: `lamsonfilter deq --once` draining 1,000 and 10,000 queued 2 KB messages beside
# Salmon's QueueReceiver on 1,000 in the same run, and the example list (bench/deq_bench.py,
# bench/README.rst); e.g. BENCH_DEQ_ARGS="--rounds 5".  A scratch Salmon venv is made in
# $BENCH_SALMON_VENV (default /tmp/salmon-venv) if missing; smtp-sink takes the list's replies.
BENCH_DEQ_ARGS ?=
bench-deq: bootstrap
	$(VENV)/bin/python bench/deq_bench.py $(BENCH_DEQ_ARGS)
