#!/usr/bin/env bash
# Install the prebuilt OHIF viewer that the hub serves (docs/viewer.md): `npm ci` in viewer/,
# exactly the version in viewer/package-lock.json, no install scripts, then gzip its text and
# wasm files once so the hub can send them precompressed. Called by demo.sh and test.sh;
# the hub itself never fetches anything.
#
# Idempotent: skipped when viewer/node_modules was installed from the same lock file (a stamp
# holds the lock's sha256) and the built viewer is there. --force reinstalls.
#
# Why `npm ci` and not `npm install`: the lock file lists @ohif/app alone on purpose. Its
# dist/ is fully built; its declared dependencies are what built it (webpack, the OHIF
# sources) and are neither needed nor all on every registry mirror. `npm install` would
# rewrite the lock with them.
set -euo pipefail
cd "$(dirname "$0")/../viewer"

force=0
if [ "${1:-}" = --force ]; then force=1; fi

dist=node_modules/@ohif/app/dist
stamp=node_modules/.telerad-installed
want="$(sha256sum package-lock.json | cut -d' ' -f1)"

if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dist/index.html" ]; then
  echo "viewer: OHIF $(node -p 'require("./node_modules/@ohif/app/package.json").version' 2>/dev/null || echo '?') already installed (viewer/$dist)"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "viewer: installing Debian packages nodejs npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  else
    echo "viewer: npm not found: install Node.js and npm (apt-get install nodejs npm), then run scripts/install_viewer.sh" >&2
    exit 1
  fi
fi

pinned="$(node -p 'require("./package.json").dependencies["@ohif/app"]')"
echo "viewer: installing @ohif/app $pinned (npm ci, ~200 MB)"
rm -f "$stamp"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

installed="$(node -p 'require("./node_modules/@ohif/app/package.json").version')"
if [ "$installed" != "$pinned" ] || [ ! -f "$dist/index.html" ]; then
  echo "viewer: npm ci left @ohif/app $installed (wanted $pinned) or no $dist/index.html" >&2
  exit 1
fi

# Precompress once, at install time: the app bundle alone is ~15 MB of JavaScript (~3 MB
# gzipped). index.html and app-config.js are left alone (the hub answers those itself), and
# so are source maps (only a developer's tools load them).
echo "viewer: precompressing text and wasm files (gzip -9)"
find "$dist" -type f \( -name '*.js' -o -name '*.mjs' -o -name '*.css' -o -name '*.wasm' \
    -o -name '*.json' -o -name '*.svg' -o -name '*.html' -o -name '*.xml' -o -name '*.webapp' \) \
    ! -path "$dist/index.html" ! -path "$dist/app-config.js" -size +1k -print0 \
  | xargs -0 -r -P 2 -n 16 gzip -9 -n -k -f

echo "$want" > "$stamp"
echo "viewer: OHIF $installed installed in viewer/$dist"
