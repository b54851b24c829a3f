#!/usr/bin/env bash
# Verify the systemd unit and report its exposure. `systemd-analyze verify` needs ExecStart's binary
# to exist, so the unit is checked with the path pointed at the built binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/target/debug/menshen"
[ -x "$bin" ] || cargo build
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/bin/menshen#$bin#g" systemd/menshen.service > "$tmp/menshen.service"
systemd-analyze verify "$tmp/menshen.service"
exposure=$(systemd-analyze security --offline=true "$tmp/menshen.service" 2>/dev/null | sed -n 's/.*Overall exposure level for menshen.service: \([0-9.]*\).*/\1/p')
echo "systemd unit: verify ok, exposure $exposure (goal <= 2.0)"
awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }' || { echo "exposure $exposure is above 2.0"; exit 1; }
