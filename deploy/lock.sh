#!/usr/bin/env bash
# Regenerates the two locks:
#   deploy/requirements.lock       guarita's runtime dependencies (pyproject.toml, no extras)
#                                  and everything they pull in; the container image installs
#                                  it with pip --require-hashes.
#   deploy/requirements-test.lock  the same plus the [test] extra; `make test` installs with
#                                  it as pip constraints (hashes stripped, see .ci/install-deps).
# Each package is pinned to one version with the SHA-256 of every file PyPI has for it.
#
# A package already pinned in deploy/requirements.lock keeps its version (the lock only moves
# when someone runs `bash deploy/lock.sh --upgrade`, or `--upgrade-package NAME` for one
# package, e.g. when a new dependency needs a newer one); a new dependency resolves to
# PyPI's newest release that fits pyproject.toml. `make test-latest` runs the suite against
# the newest releases without touching either lock.
#
#   bash deploy/lock.sh [--upgrade | --upgrade-package NAME ...]     # needs network access to PyPI
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
: > "$work/constraints.txt"
release=()
upgrade_all=0
while [ $# -gt 0 ]; do
    case "$1" in
        --upgrade) upgrade_all=1 ;;
        --upgrade-package) shift; release+=("$(echo "$1" | tr 'A-Z_' 'a-z-')") ;;
        *) echo "usage: bash deploy/lock.sh [--upgrade | --upgrade-package NAME ...]" >&2; exit 2 ;;
    esac
    shift
done
if [ "$upgrade_all" = 0 ]; then
    for lock in deploy/requirements.lock deploy/requirements-test.lock; do
        [ -f "$lock" ] && grep -E '^[A-Za-z0-9_.-]+==' "$lock" | sed 's/ *\\$//' >> "$work/constraints.txt"
    done
    for name in "${release[@]}"; do
        grep -viE "^${name}==" "$work/constraints.txt" > "$work/c1" || true; mv "$work/c1" "$work/constraints.txt"
    done
    sort -u -o "$work/constraints.txt" "$work/constraints.txt"
fi
# pip-compile also keeps the pins of the file it writes: tell it what may move.
moving=()
[ "$upgrade_all" = 1 ] && moving+=(--upgrade)
for name in "${release[@]}"; do moving+=(--upgrade-package "$name"); done
compile() {  # OUTPUT [EXTRA]
    "$work/venv/bin/pip-compile" --quiet ${moving[@]+"${moving[@]}"} --generate-hashes --strip-extras --allow-unsafe --annotation-style line \
        --no-emit-index-url --no-emit-find-links --index-url https://pypi.org/simple \
        --constraint "$work/constraints.txt" ${2:+--extra "$2"} \
        --output-file "$1" pyproject.toml
    # pip-compile records its own command line and the temporary constraints file: keep the
    # lock reproducible byte for byte.
    sed -i -e 's|^#    pip-compile .*|#    bash deploy/lock.sh|' \
           -e 's|-c [^ ,]*constraints\.txt, ||' -e 's|  *# via -c [^ ,]*constraints\.txt$||' "$1"
    echo "wrote $1 ($(grep -c '^[a-z0-9]' "$1") packages)"
}
compile deploy/requirements.lock
# The test lock starts from the runtime lock just written, so both agree on every shared pin.
grep -E '^[A-Za-z0-9_.-]+==' deploy/requirements.lock | sed 's/ *\\$//' >> "$work/constraints.txt"
sort -u -o "$work/constraints.txt" "$work/constraints.txt"
awk -F'==' '!seen[tolower($1)]++' "$work/constraints.txt" > "$work/c2" && mv "$work/c2" "$work/constraints.txt"
compile deploy/requirements-test.lock test
