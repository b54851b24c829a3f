#!/usr/bin/env bash
# The gate against a real Home Assistant: HA from PyPI, installed with HA's own
# package_constraints.txt as pip constraints into a cached venv, then tests/ha_real.rs (a real
# mosquitto, the real daemon, HA's MQTT integration set up through its REST config flow).
#
#   scripts/ha-real.sh               # HA 2025.4.4 on Python 3.13, in a Debian 13 root (root needed)
#   HA_VERSION=2024.3.3 scripts/ha-real.sh --host
#                                    # HA 2024.3.3 on this machine's Python 3.11 (no root needed)
#
# HA 2025.x needs Python 3.13, which Debian 12 does not have: the default makes a minimal Debian 13
# ("trixie") root with debootstrap (about a minute) in ${HA_ROOT:-/srv/menshen-ha-trixie} and runs
# HA there with chroot; the broker and the gate run here, on the same loopback. 2024.3.3 is the
# last HA that runs on Python 3.11. Caches: the root, and the venv in it (or, with --host, in
# ${MENSHEN_HA_CACHE:-~/.cache/menshen-ha}/<version>).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=root
[ "${1:-}" = "--host" ] && mode=host
HA_VERSION=${HA_VERSION:-2025.4.4}
start=$(date +%s)
# (g++ and python3.13-dev: ciso8601, lru-dict and two audio packages HA pins have no 3.13 wheel.)
# The integrations the test loads; their pinned requirements are installed up front, so HA runs
# with --skip-pip and downloads nothing while the test runs.
integrations="mqtt http api config onboarding automation frontend backup hardware recorder analytics cloud"

if [ "$mode" = root ]; then
    [ "$(id -u)" = 0 ] || { echo "ha-real: the Debian 13 root needs root (or use --host with HA_VERSION=2024.3.3)" >&2; exit 2; }
    ROOT=${HA_ROOT:-/srv/menshen-ha-trixie}
    if [ ! -x "$ROOT/usr/bin/python3.13" ]; then
        command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
        echo "ha-real: debootstrap Debian 13 into $ROOT"
        debootstrap --variant=minbase --include=python3.13,python3.13-venv,python3.13-dev,g++,ca-certificates trixie "$ROOT" \
            "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    fi
    # This machine's name resolution and CA bundle (a proxy's CA, if it has one) for pip.
    cp /etc/resolv.conf /etc/hosts "$ROOT/etc/"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    # The test's temporary HA config directory is under /tmp: the same path inside the root.
    mountpoint -q "$ROOT/tmp" || mount --bind /tmp "$ROOT/tmp"
    inside=/opt/ha-$HA_VERSION
    venv="$ROOT$inside"
    run() { chroot "$ROOT" "$@"; }
    py=python3.13
else
    cache=${MENSHEN_HA_CACHE:-$HOME/.cache/menshen-ha}
    inside="$cache/$HA_VERSION"
    venv=$inside
    run() { "$@"; }
    py=${HA_PYTHON:-python3}
fi

if [ ! -f "$venv/.complete" ]; then
    echo "ha-real: installing Home Assistant $HA_VERSION into $venv"
    rm -rf "$venv"
    run "$py" -m venv "$inside"
    run "$inside/bin/pip" download -q --no-deps -d "$inside/dl" "homeassistant==$HA_VERSION"
    wheel=$(cd "$venv/dl" && ls homeassistant-"$HA_VERSION"-*.whl)
    python3 -c "import sys, zipfile; sys.stdout.write(zipfile.ZipFile(sys.argv[1]).read('homeassistant/package_constraints.txt').decode())" \
        "$venv/dl/$wheel" > "$venv/constraints.txt"
    # shellcheck disable=SC2046,SC2086
    run "$inside/bin/pip" install -q -c "$inside/constraints.txt" "$inside/dl/$wheel" \
        $(python3 scripts/ha_requirements.py "$venv/dl/$wheel" $integrations)
    touch "$venv/.complete"
    echo "ha-real: venv ready in $(( $(date +%s) - start )) s"
fi

if [ "$mode" = root ]; then
    hass="$venv/hass-in-root"
    printf '#!/bin/sh\nexec chroot %s %s/bin/hass "$@"\n' "$ROOT" "$inside" > "$hass"
    chmod +x "$hass"
else
    hass="$venv/bin/hass"
fi
echo "ha-real: Home Assistant $("$hass" --version)"
MENSHEN_HA_HASS="$hass" cargo test --release --features ha-real --test ha_real -- --nocapture
echo "ha-real: passed in $(( $(date +%s) - start )) s"
