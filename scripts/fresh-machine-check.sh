#!/usr/bin/env bash
# Prove the README's first command on a fresh machine: a minimal Debian 12 root (debootstrap) with
# only what any machine with a Rust toolchain has (ca-certificates, git, gcc, libc6-dev), the Rust
# toolchain bind-mounted read-only (RUSTUP_HOME and the rustup binary with its proxies), a fresh
# clone of this repository's HEAD and ../shared beside it.
# Nothing else comes in: not the cargo registry, not target/, not the host's packages. Inside, it
# runs `scripts/demo.sh --once` and fails unless a card grant, a face grant, the events on the broker
# and a verified deletion receipt appear. It prints the time from the clone to the first decision.
#
# Needs root (debootstrap, chroot, mounts). The bare Debian root is made once and kept in
# $MENSHEN_FRESH_CACHE (default /var/cache/menshen-fresh; it holds only Debian's minbase); each run
# works on a new copy of it, removed afterwards.
#
# usage: scripts/fresh-machine-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
shared=$(cd .. && pwd)/shared
[ "$(id -u)" -eq 0 ] || { echo "fresh-machine-check: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
[ -d "$shared/models" ] || { echo "fresh-machine-check: no ../shared beside the clone" >&2; exit 1; }
cache=${MENSHEN_FRESH_CACHE:-/var/cache/menshen-fresh}
mirror=${MENSHEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
rustup_bin=$(readlink -f "$(command -v rustup)")
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

command -v debootstrap >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

t_start=$(date +%s)
if [ ! -x "$cache/base/bin/bash" ]; then
  echo "== bare Debian 12 root (once, kept in $cache/base)"
  rm -rf "$cache/base.new"
  mkdir -p "$cache"
  debootstrap --variant=minbase bookworm "$cache/base.new" "$mirror" >/dev/null
  mv "$cache/base.new" "$cache/base"
fi

work=$(mktemp -d /var/tmp/menshen-fresh.XXXXXX)
root=$work/root
cleanup() {
  # Lazily, deepest first: a failed step may leave a process holding a mount.
  for m in $(awk -v r="$root" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
echo "== a fresh copy of the bare root in $root"
cp -a "$cache/base" "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/etc/ssl/certs"
cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
# No service may start in the chroot (it shares the host's network): apt's convention.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"

mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mkdir -p "$root/root/.rustup" "$root/root/.cargo/bin" "$root/work/shared"
mount --bind "$rustup_home" "$root/root/.rustup" && mount -o remount,bind,ro "$root/root/.rustup"
# The rustup binary alone (read-only) and its proxies: no cargo tool or registry comes along.
touch "$root/root/.cargo/bin/rustup"
mount --bind "$rustup_bin" "$root/root/.cargo/bin/rustup" && mount -o remount,bind,ro "$root/root/.cargo/bin/rustup"
for n in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt; do ln -s rustup "$root/root/.cargo/bin/$n"; done
mount --bind "$shared" "$root/work/shared" && mount -o remount,bind,ro "$root/work/shared"

inside() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash -c "$1"
}

echo "== what any machine with a Rust toolchain has: ca-certificates git gcc libc6-dev"
inside 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates git gcc libc6-dev >/dev/null'
# ca-certificates rebuilt the bundle without the registries' CA: put the machine's back.
cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
inside 'cargo --version && rustc --version'

echo "== clone and run the README's first command: scripts/demo.sh --once"
t_clone=$(date +%s)
git clone -q "$repo" "$root/work/menshen"
log=$work/demo.log
first=""
set +e
inside 'cd /work/menshen && scripts/demo.sh --once' 2>&1 | while IFS= read -r line; do
  printf '%s\n' "$line" >> "$log"
  case "$line" in
    *"BMS ◀ event/access"*)
      if [ ! -e "$work/first" ]; then
        echo "$(( $(date +%s) - t_clone ))" > "$work/first"
        echo "   first decision on the broker $(cat "$work/first") s after the clone"
      fi ;;
    "demo.sh: set-up done"*|"Menshen demo:"*|*"receipt valid"*|"Face part off"*|"BMS view"*|"setup-deps:"*|"error"*) echo "   $line" ;;
  esac
done
rc=${PIPESTATUS[0]}
set -e
t_end=$(date +%s)
[ -e "$work/first" ] && first=$(cat "$work/first")

fail() { echo "fresh-machine-check: FAILED: $1 (last lines of the demo:)" >&2; tail -n 40 "$log" >&2; exit 1; }
[ "$rc" -eq 0 ] || fail "scripts/demo.sh --once exited $rc"
grep -q 'BMS ◀ event/access .*"decision":"granted".*"method":"card"' "$log" || fail "no card grant on the broker"
grep -q 'BMS ◀ event/access .*"decision":"granted".*"method":"face"' "$log" || fail "no face grant on the broker"
grep -q 'BMS ◀ event/alarm .*door_forced' "$log" || fail "no alarm on the broker"
grep -q 'BMS ◀ event/privacy .*template_deleted' "$log" || fail "no deletion receipt on event/privacy"
grep -q 'receipt valid: gate' "$log" || fail "the deletion receipt was not verified"
# The demo's broker went with it: no mosquitto left running from the chroot.
if pgrep -f "$root" >/dev/null 2>&1; then fail "a process from the fresh root is still running"; fi
echo "fresh-machine-check: ok. Clone to first decision: ${first:-?} s; clone to the end of the demo: $(( t_end - t_clone )) s; whole check (with the root): $(( t_end - t_start )) s"
