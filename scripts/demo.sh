#!/usr/bin/env bash
# The README's first command. On a fresh Debian or Ubuntu machine with a Rust toolchain it sets up
# everything the demo needs, then runs it (`menshen demo`; arguments are passed on, e.g. --once):
#  - the build dependencies and mosquitto (scripts/setup-deps.sh --demo; sudo when not root, or it
#    says what to run as root);
#  - the pinned ONNX Runtime and the face models into target/menshen-runtime, sha256-checked
#    (models from ../shared/models when it is beside the clone, else the manifest's download);
#  - the release build of menshen.
# Face photos come from ../shared/data/lfw when it is there (LFW is never shipped), or from
# MENSHEN_DEMO_PHOTOS (four or more JPEGs of one person); without them the demo says the face part is
# off. The demo starts a mosquitto of its own on a free loopback port and stops it when it ends.
# Idempotent: the second time, every step finds its work done (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
scripts/setup-deps.sh --demo
if [ -z "${CARGO_HOME:-}" ] && [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
if ! out=$(python3 scripts/setup_runtime.py --dest target/menshen-runtime 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "$out" | grep -v ': present, sha256 ok' || true
cargo build --release --locked --bin menshen
echo "demo.sh: set-up done in $(( $(date +%s) - t0 )) s"
exec target/release/menshen demo "$@"
