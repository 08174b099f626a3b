#!/usr/bin/env bash
# Installs the Debian packages the test suite runs as real services, when
# they are missing. Needs root (or sudo) the first time only.
set -euo pipefail

packages=(mosquitto mosquitto-clients victoria-metrics prometheus influxdb influxdb-client)
programs=(/usr/sbin/mosquitto /usr/bin/mosquitto_pub /usr/bin/victoria-metrics
          /usr/bin/prometheus /usr/bin/promtool /usr/bin/influxd)

missing=0
for program in "${programs[@]}"; do
    [ -x "$program" ] || missing=1
done
[ "$missing" = 0 ] && exit 0

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing Debian packages: ${packages[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# The packages may start their daemons; the tests run their own copies.
for unit in mosquitto victoria-metrics prometheus prometheus-node-exporter influxdb; do
    $sudo systemctl disable --now "$unit" >/dev/null 2>&1 || true
done
