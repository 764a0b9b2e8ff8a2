#!/bin/sh
# Builds guarita's virtualenv in two steps, so that an image build caches the first:
#
#   install.sh deps VENV SOURCE_DIR   the pinned, hash-checked dependencies from
#                                     SOURCE_DIR/deploy/requirements.lock (wheels only)
#   install.sh app  VENV SOURCE_DIR   guarita itself, without dependencies; then
#                                     `pip check` and pip's removal from the venv
#
# Used by deploy/Dockerfile (build stage), by tests/test_deploy.py (so the test runs
# exactly what the image build runs) and for a plain host (docs/operations.md). The
# dependencies are wheels only (--only-binary): none of them is compiled. guarita itself
# compiles its masking engine (bastion/masking/_engine.c) where gcc and OpenSSL's headers
# are present, and `app` says whether it did: without it, masking runs in Python (slower,
# same output). Likewise the recorder's JSON escaping (recorder/_escape.c, gcc only).
set -eu
step=$1
venv=$2
src=$3
pip="$venv/bin/python -m pip --no-cache-dir --disable-pip-version-check --quiet"

case "$step" in
  deps)
    python3 -m venv "$venv"
    $pip install --require-hashes --only-binary=:all: --no-deps -r "$src/deploy/requirements.lock"
    ;;
  app)
    # The build backend (setuptools) is fetched into an isolated build environment and
    # discarded; guarita's dependencies all came from the lock in the deps step.
    $pip install --no-deps "$src"
    # Fails the build if the lock misses a dependency of guarita's.
    $pip check
    if "$venv/bin/python" -c "import bastion.masking._engine" 2>/dev/null; then
      echo "install.sh: the compiled masking engine is built"
    else
      echo "install.sh: WARNING: no compiled masking engine (install gcc and libssl-dev to build it); masking runs in Python" >&2
    fi
    # The recorder's JSON escaping (recorder/_escape.c) needs only gcc; without it, Python (~1 CPU s/GB of text more).
    if ! "$venv/bin/python" -c "import recorder._escape" 2>/dev/null; then
      echo "install.sh: WARNING: no compiled recorder escaping (install gcc to build it); recording text costs more CPU" >&2
    fi
    # pip is not needed at run time.
    $pip uninstall --yes pip
    ;;
  *)
    echo "usage: install.sh deps|app VENV SOURCE_DIR" >&2
    exit 2
    ;;
esac
