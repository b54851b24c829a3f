#!/usr/bin/env bash
# Packages and cross-builds, as CI checks them every run:
#  - amd64: build the .deb, install it, check the installed binary, config and systemd unit, purge it;
#  - aarch64: cross-build the release binary (default features) and its .deb without Docker, check it is
#    an aarch64 ELF and run `--version` and `check-config` under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v file >/dev/null 2>&1 || need+=(file)
command -v adduser >/dev/null 2>&1 || need+=(adduser)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -q '^aarch64-unknown-linux-gnu$' || rustup target add aarch64-unknown-linux-gnu
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked

echo "== amd64 package"
cargo deb
deb=$(ls -t target/debian/menshen_*_amd64.deb | head -n 1)
$SUDO dpkg -i "$deb" >/dev/null
/usr/bin/menshen --version
/usr/bin/menshen check-config /etc/menshen/menshen.toml
systemd-analyze verify /lib/systemd/system/menshen.service
id menshen | grep -q '(gpio)' && id menshen | grep -q '(video)'
[ "$(stat -c '%a %U:%G' /etc/menshen/menshen.toml)" = "640 root:menshen" ]
# No credentials in the shipped config: no username or password set.
! grep -Eq '^[[:space:]]*(username|password|password_file)[[:space:]]*=' /etc/menshen/menshen.toml
$SUDO dpkg --purge menshen >/dev/null
[ ! -e /usr/bin/menshen ]
echo "amd64: $(basename "$deb") installed, verified, purged"

echo "== aarch64 cross-build"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cargo deb --target aarch64-unknown-linux-gnu
bin=target/aarch64-unknown-linux-gnu/release/menshen
file "$bin" | tee /dev/stderr | grep -q 'ELF 64-bit LSB .* ARM aarch64'
qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" --version
qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" check-config config/menshen.rpi.toml
adeb=$(ls -t target/debian/menshen_*_arm64.deb | head -n 1)
dpkg-deb -f "$adeb" Architecture | grep -qx arm64
echo "aarch64: $bin is an aarch64 ELF, runs under qemu; $(basename "$adeb") built"
