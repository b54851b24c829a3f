#!/usr/bin/env bash
# The runtime/models setup must install verified files and refuse a file whose sha256 differs.
# With --online it also fetches and verifies the ONNX Runtime wheel from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
models_src="${MENSHEN_MODELS_DIR:-../shared/models}"
[ -d "$models_src" ] || { echo "check-setup-runtime: no model source ($models_src)"; exit 1; }
scripts/setup-runtime.sh --models-only --dest "$tmp/ok" >/dev/null
[ "$(ls "$tmp/ok/models" | wc -l)" -eq "$(grep -c '^\[\[model\]\]' models/manifest.toml)" ]
# A model with one byte changed must be refused, and nothing installed under its name.
mkdir -p "$tmp/bad"
cp "$models_src"/*.onnx "$tmp/bad/"
python3 - "$tmp/bad/yunet_s_dynamic.onnx" <<'PY'
import sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[1000] ^= 0xFF; open(p, "wb").write(bytes(b))
PY
if MENSHEN_MODELS_DIR="$tmp/bad" scripts/setup-runtime.sh --models-only --dest "$tmp/t" 2>"$tmp/err"; then
  echo "check-setup-runtime: a tampered model was accepted"; exit 1
fi
grep -q "refusing it" "$tmp/err"
[ ! -e "$tmp/t/models/yunet_s_dynamic.onnx" ]
if [ "${1:-}" = "--online" ]; then
  scripts/setup-runtime.sh --runtime-only --dest "$tmp/rt" >/dev/null
  [ -s "$tmp/rt/lib/libonnxruntime.so.1.31.1" ]
fi
echo "setup-runtime: verified install ok, tampered model refused${1:+ (runtime fetched from PyPI and verified)}"
