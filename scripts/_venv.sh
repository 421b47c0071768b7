# Shared by demo.sh and test.sh: a virtualenv in .venv (override with TELERAD_VENV).
VENV="${TELERAD_VENV:-.venv}"
ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$VENV"; python3 -m venv "$VENV"
      else
        echo "python3 -m venv failed: install python3-venv" >&2; return 1
      fi
    fi
    "$VENV/bin/pip" install -q --upgrade pip
  fi
}
