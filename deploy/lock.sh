#!/usr/bin/env bash
# Regenerates deploy/requirements.lock: guarita's runtime dependencies (pyproject.toml,
# [project] dependencies, no extras) and everything they pull in, each pinned to one
# version with the SHA-256 of every file PyPI has for it (so the image build runs with
# pip --require-hashes, on amd64 and arm64 alike).
#
# Versions are constrained to what is installed in the current environment (the one the
# test suite ran on), so the image gets what was tested; a dependency that is not
# installed resolves to PyPI's newest release that fits pyproject.toml.
#
#   bash deploy/lock.sh          # needs network access to PyPI
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
# Ignore machine-local pip settings (local wheel folders, extra indexes): the lock must
# name only files PyPI serves.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT
"$work/venv/bin/pip" install --quiet --disable-pip-version-check 'pip-tools>=7.4'
# The tested versions, minus the project itself (editable) and anything not on PyPI.
PIP_CONFIG_FILE= "$PYTHON" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$work/constraints.txt" || true
"$work/venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe --annotation-style line \
    --no-emit-index-url --no-emit-find-links --index-url https://pypi.org/simple \
    --constraint "$work/constraints.txt" \
    --output-file deploy/requirements.lock pyproject.toml
# pip-compile records its own command line and the temporary constraints file: keep the
# lock reproducible byte for byte.
sed -i -e 's|^#    pip-compile .*|#    bash deploy/lock.sh|' \
       -e 's|-c [^ ,]*constraints\.txt, ||' -e 's|  *# via -c [^ ,]*constraints\.txt$||' deploy/requirements.lock
echo "wrote deploy/requirements.lock ($(grep -c '^[a-z0-9]' deploy/requirements.lock) packages)"
