# lamsonfilter developer entry points.  `make test` is what CI (.ci/run) runs.
VENV := .venv
PYTEST_ARGS ?=

.PHONY: bootstrap test run check

bootstrap:
	@bash scripts/bootstrap.sh

# pytest exit status is passed on unchanged (5 = no tests collected is a failure too)
test: bootstrap
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

run: bootstrap
	$(VENV)/bin/lamsonfilter test --app examples/mailinglist examples/mailinglist/samples/

check: bootstrap
	$(VENV)/bin/mypy --explicit-package-bases lamsonfilter tests/rig
