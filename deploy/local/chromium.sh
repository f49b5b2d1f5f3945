#!/usr/bin/env bash
# Installs Debian's chromium when /usr/bin/chromium is missing, for the dashboard's browser test
# (dashboards/browser_test.go drives it headless through chromedp). Idempotent and quiet: prints
# nothing when chromium is already there, one line while installing, and the tail of the apt log on
# failure. Fonts come with the package's dependencies (fonts-liberation), so screenshots render text.
#
# Usage: deploy/local/chromium.sh        (make test runs it before go test)
# Environment: CHROMIUM_BIN [/usr/bin/chromium]  ANALYTICS_DATA_DIR [<repo>/.data] (apt log location)
set -euo pipefail

CHROMIUM_BIN=${CHROMIUM_BIN:-/usr/bin/chromium}
[ -x "$CHROMIUM_BIN" ] && exit 0

ROOT=$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/../.." && pwd -P)
DATA_DIR=${ANALYTICS_DATA_DIR:-$ROOT/.data}
mkdir -p "$DATA_DIR"
aptlog=$DATA_DIR/apt-chromium.log

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "chromium.sh: $CHROMIUM_BIN is missing; install it as root: apt-get install -y chromium" >&2
    exit 1
  fi
fi

echo "chromium.sh: installing Debian package chromium (log: $aptlog)" >&2
# The lock wait matters when stack.sh is installing its own packages at the same time.
if ! { "${sudo[@]}" apt-get update \
       && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 chromium fonts-liberation; } \
       >"$aptlog" 2>&1; then
  tail -n 30 "$aptlog" >&2 || true
  echo "chromium.sh: apt-get install chromium failed (see $aptlog)" >&2
  exit 1
fi
if [ ! -x "$CHROMIUM_BIN" ]; then
  echo "chromium.sh: $CHROMIUM_BIN still missing after installing chromium" >&2
  exit 1
fi
