#!/usr/bin/env bash
# Packages and cross-builds, as CI checks them every run:
#  - amd64: build the .deb, install it, check the installed binary, config and systemd unit, purge it;
#  - aarch64: cross-build the release binary (default features) and its .deb without Docker, check it is
#    an aarch64 ELF and run `--version`, `check-config` and a store round-trip under qemu-user;
#  - armv7 (32-bit boards): the same, with its armhf .deb.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v file >/dev/null 2>&1 || need+=(file)
command -v adduser >/dev/null 2>&1 || need+=(adduser)
command -v lintian >/dev/null 2>&1 || need+=(lintian)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  rustup target list --installed | grep -q "^$t\$" || rustup target add "$t"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Run a cross-built binary under qemu-user: --version, check-config, and a real store round-trip.
under_qemu() {
  local qemu=$1 sysroot=$2 bin=$3 name=$4
  "$qemu" -L "$sysroot" "$bin" --version
  "$qemu" -L "$sysroot" "$bin" check-config config/menshen.rpi.toml
  sed "s#/var/lib/menshen#$tmp/$name-state#" config/menshen.rpi.toml > "$tmp/$name.toml"
  "$qemu" -L "$sysroot" "$bin" resident add r-1 --card H10301:7:12345 --config "$tmp/$name.toml"
  "$qemu" -L "$sysroot" "$bin" resident list --config "$tmp/$name.toml" | grep -q 'r-1.*H10301:\*:\*45'
}
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked

# The man pages, from the CLI definition (the same pages go into every architecture's package).
rm -rf target/man
cargo run --quiet --example man -- target/man
gzip -9n target/man/*.1

# lintian on a package: nothing reported, errors and warnings alike (info tags are shown).
lint() {
  local out rc=0
  out=$(lintian --fail-on error,warning --tag-display-limit 0 "$1" 2>&1) || rc=$?
  out=$(printf '%s\n' "$out" | grep -v -e '^running with root privileges' -e '^$' || true)
  if [ "$rc" -ne 0 ]; then
    echo "lintian on $(basename "$1") (exit $rc):"; echo "$out"; return 1
  fi
  [ -z "$out" ] || echo "$out"
  echo "lintian: $(basename "$1") clean"
}

echo "== amd64 package"
cargo deb
deb=$(ls -t target/debian/menshen_*_amd64.deb | head -n 1)
$SUDO dpkg -i "$deb" >/dev/null
/usr/bin/menshen --version
/usr/bin/menshen check-config /etc/menshen/menshen.toml
systemd-analyze verify /lib/systemd/system/menshen.service
id menshen | grep -q '(gpio)' && id menshen | grep -q '(video)'
# 0644 root: the config holds no secret (the MQTT password is in its own 0600 file).
[ "$(stat -c '%a %U:%G' /etc/menshen/menshen.toml)" = "644 root:root" ]
man -w menshen >/dev/null 2>&1 || [ -e /usr/share/man/man1/menshen.1.gz ]
zcat /usr/share/man/man1/menshen-resident-add.1.gz | grep -q 'resident\\-add\|resident-add'
lint "$deb"
# No credentials in the shipped config: no username or password set.
! grep -Eq '^[[:space:]]*(username|password|password_file)[[:space:]]*=' /etc/menshen/menshen.toml
$SUDO dpkg --purge menshen >/dev/null
[ ! -e /usr/bin/menshen ]
echo "amd64: $(basename "$deb") installed, verified, purged"

echo "== aarch64 cross-build"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cargo deb --target aarch64-unknown-linux-gnu
bin=target/aarch64-unknown-linux-gnu/release/menshen
file "$bin"
file "$bin" | grep -q 'ELF 64-bit LSB .* ARM aarch64'
under_qemu qemu-aarch64-static /usr/aarch64-linux-gnu "$bin" aarch64
adeb=$(ls -t target/debian/menshen_*_arm64.deb | head -n 1)
dpkg-deb -f "$adeb" Architecture | grep -qx arm64
lint "$adeb"
echo "aarch64: $bin is an aarch64 ELF, runs under qemu (store round-trip ok); $(basename "$adeb") built"

echo "== armv7 cross-build (32-bit boards)"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
cargo deb --target armv7-unknown-linux-gnueabihf
bin=target/armv7-unknown-linux-gnueabihf/release/menshen
file "$bin"
file "$bin" | grep -q 'ELF 32-bit LSB .* ARM, EABI5'
under_qemu qemu-arm-static /usr/arm-linux-gnueabihf "$bin" armv7
hdeb=$(ls -t target/debian/menshen_*_armhf.deb | head -n 1)
dpkg-deb -f "$hdeb" Architecture | grep -qx armhf
lint "$hdeb"
# The packaged binary is the 32-bit ARM one.
dpkg-deb --fsys-tarfile "$hdeb" | tar -xO ./usr/bin/menshen | file - | grep -q 'ELF 32-bit LSB .* ARM, EABI5'
echo "armv7: $bin is a 32-bit ARM ELF, runs under qemu (store round-trip ok); $(basename "$hdeb") built"
