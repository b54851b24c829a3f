#!/usr/bin/env bash
# Install ONNX Runtime and the face models with checked sha256 (see scripts/setup_runtime.py --help).
set -euo pipefail
exec python3 "$(dirname "$0")/setup_runtime.py" "$@"
