#!/usr/bin/env bash
# The test command (README): dependencies, formatting, lints, every test, the systemd unit check,
# the AsyncAPI document check.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every step prints how long it took (CI keeps the whole run under 60 minutes).
step() {
  local t0=$SECONDS rc=0
  "$@" || rc=$?
  echo "== $(basename "$0"): $* -- $((SECONDS - t0)) s" >&2
  # .ci/run's table of seconds per step.
  [ -z "${MENSHEN_STEP_LOG:-}" ] || printf '  %s\t%s\t%s\n' "$(basename "$0")" "$*" "$((SECONDS - t0))" >> "$MENSHEN_STEP_LOG"
  return $rc
}
step scripts/setup-deps.sh
step cargo fmt --all -- --check
step cargo clippy --all-targets -- -D warnings
# Benches are built (so they cannot rot) but not run here: they are timed, see README.
step cargo build --release --benches
# The pinned ONNX Runtime (PyPI wheel) and the models (../shared/models offline), sha256-checked,
# for the face runtime tests.
if [ ! -f target/menshen-runtime/lib/libonnxruntime.so.1.31.1 ]; then
  scripts/setup-runtime.sh --dest target/menshen-runtime
fi
# The Python reference pipeline (numpy, OpenCV, onnxruntime from PyPI) that the face tests
# compare the Rust pipeline against.
step scripts/setup-pyref.sh
step cargo test --lib --bins --tests
# Power cuts: the store, the key files and the audit file on cutfs (a FUSE filesystem that drops
# unsynced writes on command; needs root and /dev/fuse), 30 rounds.
step cargo fmt --manifest-path tools/cutfs/Cargo.toml -- --check
step cargo clippy --release --manifest-path tools/cutfs/Cargo.toml -- -D warnings
step cargo build --release --manifest-path tools/cutfs/Cargo.toml
step cargo build --example power_cut_writer --features powercut
step cargo test --features powercut --test power_cut -- --nocapture
# The `opencv` feature (OpenCV VideoCapture: RTSP and video files): lints, its unit tests and a
# video made from the smoke images at test time read through the face pipeline.
step cargo clippy --all-targets --features opencv,ha-real -- -D warnings   # also lints tests/ha_real.rs (run by scripts/ha-real.sh)
step cargo test --features opencv --lib face::ocv
step cargo test --features opencv --test opencv_source
# Face accuracy: the LFW protocol through the Rust pipeline (about 3 minutes).
step scripts/check-lfw.sh
step scripts/check-systemd.sh
# docs/asyncapi.yaml: up to date with docs/schemas and valid (AsyncAPI CLI from npm).
step scripts/check-asyncapi.sh
step scripts/check-setup-runtime.sh
