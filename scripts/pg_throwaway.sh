#!/usr/bin/env bash
# A throwaway PostgreSQL cluster in a directory, for tests, CI and benchmarks (never the
# system service). Shared by .ci/run and tests/pg_kit.py so both start it the same way.
#
#   scripts/pg_throwaway.sh start DIR   initdb into DIR/data, start it on a Unix socket in
#                                       DIR (no TCP), print the DSN on stdout (one line)
#   scripts/pg_throwaway.sh stop DIR    stop it (fast shutdown); DIR is left for the caller
#
# PostgreSQL refuses to run as root: as root, DIR is handed to the `postgres` user (created by
# Debian's package) and the server runs as that user; clients connect as role `postgres`
# over the socket with trust authentication (the socket lives in DIR, mode 0700 parent).
# Binaries: PG_BIN if set, else the newest /usr/lib/postgresql/*/bin, else initdb on PATH.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

bin=${PG_BIN:-}
if [ -z "$bin" ]; then
  newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$newest" ] && [ -x "$newest/initdb" ]; then
    bin=$newest
  elif command -v initdb >/dev/null 2>&1; then
    bin=$(dirname "$(command -v initdb)")
  else
    echo "error: PostgreSQL server binaries not found (apt-get install -y postgresql, or set PG_BIN)" >&2
    exit 1
  fi
fi

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    # From /: the caller's directory may be one the postgres user cannot enter (pg_ctl then
    # prints "could not change directory ... Permission denied").
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
      chown postgres "$dir"
      # The server user must reach DIR: let it traverse every parent (tmp dirs are 0700).
      p=$dir
      while [ "$p" != / ]; do p=$(dirname "$p"); chmod o+x "$p" 2>/dev/null || true; done
      role=postgres
    else
      role=$(id -un)
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U "$role" --auth=trust -E UTF8 --no-locale \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    # Durable like production (fsync on); a socket in DIR and no TCP listener.
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-k $dir -c listen_addresses='' -c max_connections=300 -c shared_buffers=64MB" \
      start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "postgresql://$role@/postgres?host=$dir"
    ;;
  stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    fi
    ;;
  *)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
