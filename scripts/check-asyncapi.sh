#!/usr/bin/env bash
# Validate docs/asyncapi.yaml with the AsyncAPI CLI (npm), after checking that it is up to date
# with the JSON Schemas it is generated from. The CLI is installed into a cache directory once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps.sh
python3 scripts/gen-asyncapi.py --check
TOOLS="${MENSHEN_TOOLS:-$HOME/.cache/menshen-tools}/asyncapi"
if [ ! -x "$TOOLS/node_modules/.bin/asyncapi" ]; then
    command -v npm >/dev/null || { echo "npm is needed (apt-get install npm)"; exit 1; }
    mkdir -p "$TOOLS"
    # @asyncapi/cli 4.x runs on Node 20 (6.x needs Node 24).
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error @asyncapi/cli@4 >/dev/null
fi
export ASYNCAPI_ANALYTICS=false
"$TOOLS/node_modules/.bin/asyncapi" config analytics --disable >/dev/null 2>&1 || true
"$TOOLS/node_modules/.bin/asyncapi" validate docs/asyncapi.yaml --fail-severity=warn
