#!/usr/bin/env bash
# Installs the Debian packages the test suite drives as real peers, only where absent.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v ip >/dev/null || need+=(iproute2)
# The Compose validator for the deployment test (the plugin where Docker ships it, else v1).
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || need+=(docker-compose)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root, or install them yourself)" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts Orthanc as a system service on 4242/8042; the tests start their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
  systemctl stop orthanc || true
fi
