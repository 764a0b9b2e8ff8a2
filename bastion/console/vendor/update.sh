#!/bin/sh
# Refresh the vendored browser assets in ../static from the pinned npm packages (package.json,
# package-lock.json). The gateway serves the copies in static/ (committed, package data):
# nothing is fetched at run time, so air-gapped installs and `pip install -e .` work.
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund >/dev/null
src=node_modules/asciinema-player
cp "$src/dist/bundle/asciinema-player.min.js" "$src/dist/bundle/asciinema-player.css" ../static/
cp "$src/LICENSE" ../static/asciinema-player.LICENSE
# The bundle includes solid-js (MIT): its notice goes along.
{ echo "asciinema-player.min.js bundles solid-js:"; echo; cat node_modules/solid-js/LICENSE; } \
    > ../static/solid-js.LICENSE
{ echo "asciinema-player $(node -p "require('./$src/package.json').version") (Apache-2.0)"
  echo "solid-js $(node -p "require('./node_modules/solid-js/package.json').version") (MIT, bundled in it)"; } \
    > ../static/VERSIONS
