#!/usr/bin/env bash
# Prepares the demo used by `make run`: migrate, tenant "demo", and one all-scopes API key.
# The key is shown once by analyticsd, so it is kept in .data/demo.key and reprinted on later runs.
set -euo pipefail
bin=${1:?usage: demo.sh path/to/analyticsd}
root=$(cd "$(dirname "$0")/../.." && pwd)
data=${ANALYTICS_DATA_DIR:-$root/.data}
keyfile=$data/demo.key

"$bin" migrate
"$bin" tenant create --slug demo --name "Demo tenant" --if-not-exists >/dev/null
if [ ! -s "$keyfile" ]; then
  "$bin" apikey create --tenant demo --name demo --scopes events:write,analytics:read,analytics:admin | tail -n 1 >"$keyfile.tmp"
  mv "$keyfile.tmp" "$keyfile"
fi
addr=${ANALYTICS_ADDR:-:8080}
port=${addr##*:}
cat >&2 <<MSG

  analyticsd demo
  tenant:    demo
  API key:   $(cat "$keyfile")
  dashboard: http://127.0.0.1:$port/dashboard   (sign in with the key and tenant demo)
  API:       http://127.0.0.1:$port/api/analytics/   (header X-Tenant-Slug: demo)
  readiness: http://127.0.0.1:$port/readiness

MSG
