#!/usr/bin/env bash
# Install what the tests need on a fresh Debian machine: mosquitto (a real broker the tests start
# on loopback ports, also with TLS), openssl (test certificates), systemd-analyze (unit checks),
# python3-jinja2 (renders the Home Assistant command template as HA would), python3-yaml and npm
# (the AsyncAPI document check), libclang and OpenCV (camera sources), a C compiler (the simulated
# V4L2 device). Idempotent; uses sudo when
# not root.
#
# `--demo`: only what `scripts/demo.sh` (the README's first command) needs: a C compiler and
# libclang (the build), mosquitto (the demo's own broker), python3 (the runtime set-up).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
# Install the packages in need[], or say exactly what to run when this user cannot.
install_needed() {
  [ ${#need[@]} -gt 0 ] || return 0
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "setup-deps: missing packages and no sudo here; as root, run:" >&2
    echo "  apt-get update && apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "setup-deps: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
}
if [ "${1:-}" = "--demo" ]; then
  { command -v cc >/dev/null 2>&1 && [ -e /usr/include/linux/videodev2.h ] && [ -e /usr/include/stdio.h ]; } || need+=(gcc libc6-dev linux-libc-dev)
  ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  [ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
  install_needed
  # The demo runs a mosquitto of its own on a loopback port: the system service that Debian's
  # package starts is not needed, and is not left running when this script installed it.
  if [[ " ${need[*]} " == *" mosquitto "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
    echo "setup-deps: mosquitto installed; its system service disabled (the demo starts its own broker)"
  fi
  exit 0
fi
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v npm >/dev/null 2>&1 || need+=(npm)
python3 -c 'import jinja2' 2>/dev/null || need+=(python3-jinja2)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
# libclang: bindgen for the v4l crate (V4L2 camera) and for the opencv crate; OpenCV itself for
# the `opencv` feature (RTSP/video sources), which the test command builds and tests too.
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev clang)
pkg-config --exists opencv4 2>/dev/null || need+=(libopencv-dev pkg-config)
# A C compiler and linux-libc-dev: tests/v4l2_camera.rs builds the simulated V4L2 device
# (tests/support/fake_v4l2.c) at test time.
{ command -v cc >/dev/null 2>&1 && [ -e /usr/include/linux/videodev2.h ]; } || need+=(gcc libc6-dev linux-libc-dev)
install_needed
