#!/usr/bin/env bash
# Starts PostgreSQL (127.0.0.1:5432, trust auth, database "test") and Redis (127.0.0.1:6379)
# when they are not already answering, so `make test` works on a fresh machine.
set -euo pipefail
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5432; then
  echo "starting PostgreSQL"
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$ver" ]; then echo "PostgreSQL is not installed" >&2; exit 1; fi
  if ! pg_lsclusters -h | grep -q " main "; then pg_createcluster "$ver" main >/dev/null; fi
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q "xray-triage" "$hba"; then
    sed -i '1i # xray-triage tests: trust on loopback\nhost all all 127.0.0.1/32 trust\nlocal all all trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  for _ in $(seq 1 60); do port_open 5432 && break; sleep 0.5; done
fi
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null 2>&1 \
  || su postgres -c "createdb test" 2>/dev/null || true

if ! port_open 6379; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 40); do port_open 6379 && break; sleep 0.25; done
fi
port_open 5432 || { echo "PostgreSQL did not start" >&2; exit 1; }
port_open 6379 || { echo "Redis did not start" >&2; exit 1; }
