#!/usr/bin/env bash
# The SQL floor: how many runs (fan-out 1) and tasks (fan-out 10) per second Postgres alone can
# record the way taskfactory records them, with every core given to it (BENCHMARKS.md).
#   scripts/sql-floor.sh [clients] [seconds]      (defaults: 4 clients, 30 s each)
# Needs psql and pgbench, and the Postgres at $PGHOST (127.0.0.1), user postgres, trust auth.
set -euo pipefail
cd "$(dirname "$0")/.."
clients="${1:-4}"
seconds="${2:-30}"
export PGHOST="${PGHOST:-127.0.0.1}" PGUSER="${PGUSER:-postgres}"
db=taskfactory_sql_floor
psql -q -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
for migration in migrations/*.sql; do
    psql -q -v ON_ERROR_STOP=1 -d "$db" -f "$migration" >/dev/null
done
psql -q -d "$db" -c "INSERT INTO activities (id, name, current_version, enabled, trigger_kind) VALUES ('00000000-0000-0000-0000-000000000001', 'bench', 1, true, 'event')"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for fan in 1 10; do
    tps="$(pgbench -n -f scripts/sql-floor.pgbench -D fan="$fan" -c "$clients" -j 2 -T "$seconds" "$db" 2>&1 |
        awk '/^tps/ {print $3}')"
    awk -v tps="$tps" -v fan="$fan" 'BEGIN {
        printf "fan-out %2d: %7.1f passes/s = %6.0f runs/s, %6.0f tasks/s\n", fan, tps, tps * 20, tps * 20 * fan }'
done
psql -q -d postgres -c "DROP DATABASE $db"
