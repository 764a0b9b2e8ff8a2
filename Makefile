# The README's commands. `make test` installs what the tests need (Debian packages, the
# Python package with its test extras at the versions in deploy/requirements-test.lock, the
# Node packages) and runs the whole suite. CI (.ci/run) runs `make test`, then `make lint`.
PYTHON ?= python3
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install deps test lint check dev test-latest

install:
	$(PYTHON) -m pip install -q -e .

deps:
	PYTHON=$(PYTHON) bash .ci/install-deps

test: deps
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -q $(PYTEST_ARGS)

lint:
	ruff check bastion recorder replay tests bench
	mypy bastion recorder replay

check: test lint

# The suite against the newest releases of every dependency, in a virtualenv of its own
# (.venv-latest), so a release that would break users shows up before the lock moves.
# Its result is reported (the exit status and the versions it ran with), never hidden.
test-latest:
	$(PYTHON) -m venv .venv-latest
	PATH="$(CURDIR)/.venv-latest/bin:$$PATH" LATEST=1 $(MAKE) test PYTHON=$(CURDIR)/.venv-latest/bin/python; \
	  status=$$?; .venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt; \
	  echo "test-latest: exit $$status with the versions in .venv-latest/versions.txt"; exit $$status

dev: install
	bastion serve --dev
