#!/usr/bin/env bash
# Quick start, command 2: install what the tests need (Debian packages when root and missing,
# the test extras in .venv), then run ruff, mypy and the whole pytest suite. A test whose peer
# (DCMTK, Orthanc, PostgreSQL, FUSE, Chromium) is missing is skipped with the reason, or fails
# with TELERAD_REQUIRE_PEERS=1 (what .ci/run sets).
set -euo pipefail
cd "$(dirname "$0")/.."
# chromium: browser tests of the viewer; nodejs npm: scripts/install_viewer.sh (the OHIF viewer).
APT_PACKAGES=(dcmtk orthanc orthanc-dicomweb postgresql python3-venv openssl fuse3 chromium fonts-dejavu-core fonts-khmeros nodejs npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  # A Node.js from elsewhere (NodeSource's nodejs bundles npm and conflicts with Debian's npm).
  if { [ "$pkg" = nodejs ] && command -v node >/dev/null 2>&1; } ||
    { [ "$pkg" = npm ] && command -v npm >/dev/null 2>&1; }; then continue; fi
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packaged Orthanc service is not ours: tests start their own instances.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
    service orthanc stop >/dev/null 2>&1 || true
  elif [ "${TELERAD_REQUIRE_PEERS:-}" = 1 ]; then
    echo "not root: tests needing ${missing[*]} will FAIL (TELERAD_REQUIRE_PEERS=1)" >&2
  else
    echo "not root: tests needing ${missing[*]} will be skipped (TELERAD_REQUIRE_PEERS=1: fail)" >&2
  fi
fi
source scripts/_venv.sh
ensure_venv
"$VENV/bin/pip" install -q -e '.[test]'
# The OHIF viewer the hub serves (once; skipped while viewer/package-lock.json is unchanged).
if ! bash scripts/install_viewer.sh; then
  echo "viewer not installed: its tests will be skipped (TELERAD_REQUIRE_PEERS=1: fail)" >&2
fi
echo "== ruff"; "$VENV/bin/ruff" check .
echo "== mypy"; "$VENV/bin/mypy"
echo "== pytest"
set +e
"$VENV/bin/pytest" "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests"; exit 1; fi
exit "$rc"
