#!/bin/sh
# Builds guarita's virtualenv: the pinned, hash-checked dependencies from
# deploy/requirements.lock, then guarita itself without dependencies.
#
#   install.sh VENV SOURCE_DIR
#
# Used by deploy/Dockerfile (build stage) and by tests/test_deploy.py, so the test runs
# exactly what the image build runs. Wheels only (--only-binary): nothing is compiled,
# so the build stage needs no compiler either.
set -eu
venv=$1
src=$2

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet \
    --require-hashes --only-binary=:all: --no-deps -r "$src/deploy/requirements.lock"
# guarita itself: no dependencies (all of them came from the lock above); the build
# backend (setuptools) is fetched into an isolated build environment and discarded.
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --quiet \
    --no-deps "$src"
# Fails the build if the lock misses a dependency of guarita's.
"$venv/bin/python" -m pip check
# pip is not needed at run time.
"$venv/bin/python" -m pip uninstall --quiet --yes pip
