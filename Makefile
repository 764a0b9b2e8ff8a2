# The README's commands. `make test` installs what the tests need (Debian packages, the
# Python package with its test extras, the Node OIDC provider) and runs the whole suite.
PYTHON ?= python3
PYTEST_WORKERS ?= 2

.PHONY: install deps test lint check dev

install:
	$(PYTHON) -m pip install -q -e .

deps:
	bash .ci/install-deps

test: deps
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -q

lint:
	ruff check bastion recorder replay tests bench
	mypy bastion recorder replay

check: deps lint
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -q

dev: install
	bastion serve --dev
