#!/usr/bin/env bash
# The gate against a real Home Assistant: HA (pinned below) from PyPI, installed with HA's own
# package_constraints.txt as pip constraints into a cached venv, then tests/ha_real.rs (a real
# mosquitto, the real daemon, HA's MQTT integration set up through its REST config flow).
#
#   scripts/ha-real.sh            # venv in ${MENSHEN_HA_CACHE:-~/.cache/menshen-ha}/<version>
#
# HA 2024.3.3 is the last release that runs on Python 3.11 (Debian 12's). Newer HA needs 3.12+
# (2025.x: 3.13): set HA_VERSION and HA_PYTHON to a matching interpreter to test one.
set -euo pipefail
cd "$(dirname "$0")/.."
HA_VERSION=${HA_VERSION:-2024.3.3}
HA_PYTHON=${HA_PYTHON:-python3}
cache=${MENSHEN_HA_CACHE:-$HOME/.cache/menshen-ha}
venv="$cache/$HA_VERSION"
start=$(date +%s)
if [ ! -x "$venv/bin/hass" ] || [ ! -f "$venv/.complete" ]; then
    echo "ha-real: installing Home Assistant $HA_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$cache/dl"
    "$HA_PYTHON" -m venv "$venv"
    "$venv/bin/pip" download -q --no-deps -d "$cache/dl" "homeassistant==$HA_VERSION"
    wheel=$(ls "$cache"/dl/homeassistant-"$HA_VERSION"-*.whl)
    constraints="$cache/constraints-$HA_VERSION.txt"
    "$venv/bin/python" -c "import sys, zipfile; sys.stdout.write(zipfile.ZipFile(sys.argv[1]).read('homeassistant/package_constraints.txt').decode())" "$wheel" > "$constraints"
    # The integrations the test loads (mqtt, http, api, config, onboarding, automation and what
    # they depend on), at the versions their manifests pin: HA then runs with --skip-pip and
    # downloads nothing while the test runs. josepy < 2: hass-nabucasa's acme needs it.
    "$venv/bin/pip" install -q -c "$constraints" "$wheel" \
        paho-mqtt==1.6.1 Pillow==10.2.0 janus==1.0.0 psutil-home-assistant==0.0.1 securetar==2024.2.1 \
        'josepy<2' SQLAlchemy==2.0.27 fnv-hash-fast==0.5.0 home-assistant-frontend==20240307.0
    touch "$venv/.complete"
    echo "ha-real: venv ready in $(( $(date +%s) - start )) s"
fi
"$venv/bin/hass" --version
MENSHEN_HA_VENV="$venv" cargo test --release --features ha-real --test ha_real -- --nocapture
echo "ha-real: passed in $(( $(date +%s) - start )) s"
