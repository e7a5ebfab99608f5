# taskfactory — common tasks. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list

# A complete local taskfactory: NATS and Postgres (started if absent), the three services, the examples
dev:
    scripts/dev.sh

# Every test: unit tests and end-to-end tests against a real nats-server and Postgres
test:
    scripts/tools.sh nats >/dev/null
    scripts/tools.sh oracle >/dev/null
    scripts/tools.sh python >/dev/null
    cargo build --workspace --bins
    if cargo nextest --version >/dev/null 2>&1; then \
        cargo nextest run --workspace --no-fail-fast; \
    else \
        cargo test --workspace; \
    fi

# Format the code
fmt:
    cargo fmt --all

# Lints, warnings as errors
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# What CI checks, and more
verify: lint test

# Apply activity specs (files or directories) to a running admin API (with TASKFACTORY_TOKEN, else just dev's token)
apply +paths:
    TASKFACTORY_TOKEN="${TASKFACTORY_TOKEN:-$(cat .state/admin-token 2>/dev/null || true)}" \
        cargo run -q --bin taskfactory-trigger -- apply {{paths}}

# Throughput and latency of a fan-out beside a raw JetStream baseline (BENCHMARKS.md); e.g. just bench --processes --events 3000 --fan-out 1
bench *args:
    scripts/tools.sh nats >/dev/null
    cargo build --release --workspace --bins
    cargo run --release -p taskfactory-tests --bin taskfactory-bench -- {{args}}

# Each service's peak memory under issue 12's attacks, release binaries as processes (BENCHMARKS.md); e.g. just bench-memory --only events
bench-memory *args:
    scripts/tools.sh nats >/dev/null
    cargo build --release --workspace --bins
    cargo run --release -p taskfactory-tests --bin taskfactory-membench -- {{args}}

# Many schedules in one trigger: creation rate, load time, RSS, fire lateness and misses at a sustained rate (BENCHMARKS.md); e.g. just bench-schedules --schedules 100000 --rate 2000
bench-schedules *args:
    scripts/tools.sh nats >/dev/null
    cargo build --release --workspace --bins
    cargo run --release -p taskfactory-tests --bin taskfactory-schedbench -- {{args}}
