#!/usr/bin/env bash
# Benchmarks (never timed assertions in tests). `scripts/bench.sh ingest` starts the pinned broker
# unless KAFKA_BOOTSTRAP is set, runs the ingest benchmark, and stops the broker.
# `scripts/bench.sh ledger` runs the ledger's append/proof benchmark (no broker needed).
# `scripts/bench.sh subject-keys` times making new subjects' keys durable in a store of 1M keys
# against writing the same shards whole (no broker needed).
# `scripts/bench.sh storage` compares storage candidates for per-partition durability (tenant
# files, a journal, redb, fjall) at 1, 10,000 and 100,000 tenants (no broker needed).
# `scripts/bench.sh recovery` builds 8 partitions with 100,000 tenants and 10M records through the
# service's write path and times opening them again after a simulated kill -9 (no broker needed).
# `scripts/bench.sh pipeline` runs the end-to-end ledger benchmark (Kafka → signed logs, latency,
# restart after kill -9) with the real binary; it starts the broker like `ingest`.
# `scripts/bench.sh budget` runs the admission/budget benchmark (in-process, HTTP at 1/16/256
# callers, event → budget topic); it starts the broker too.
# `scripts/bench.sh query [-- --events N --tenants T --days D --runs R --dir PATH --sizes zipf]` generates a
# projection (default 10M events, 100 tenants, 30 days), times the cost report, billing spend and
# an audit page in process, then the same SQL through DuckDB (installed from PyPI into
# ~/.cache/tally/venv) over the same files, and prints the ratios and bytes per event.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in
  ingest|pipeline|budget)
    if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
      export TALLY_BROKER_DATA=${TALLY_BROKER_DATA:-$(mktemp -d "${TMPDIR:-/tmp}/tally-bench-kafka.XXXXXX")}
      export TALLY_BROKER_PORT=${TALLY_BROKER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
      trap 'scripts/kafka.sh stop' EXIT
      KAFKA_BOOTSTRAP=$(scripts/kafka.sh start)
      export KAFKA_BOOTSTRAP
    fi
    case "$what" in
      ingest) cargo bench --locked -p tally-ingest --bench consume ;;
      *) cargo bench --locked -p tally --bench "$what" ;;
    esac
    ;;
  ledger)
    cargo bench --locked -p tally-log --bench ledger
    ;;
  storage)
    cargo bench --locked -p tally-log --bench storage
    ;;
  subject-keys)
    cargo bench --locked -p tally-log --bench subject_keys
    ;;
  recovery)
    cargo bench --locked -p tally --bench recovery
    ;;
  query)
    shift
    [ "${1:-}" = "--" ] && shift
    venv=$HOME/.cache/tally/venv
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb, pytz' 2>/dev/null; then
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet 'duckdb==1.4.2' 'pytz==2025.2'
    fi
    out=$(mktemp)
    cargo bench --locked -p tally-query --bench query -- "$@" | tee "$out"
    dir=$(sed -n 's|^results: \(.*\)/results.json$|\1|p' "$out")
    "$venv/bin/python" bench/duckdb_compare.py "$dir"
    ;;
  *)
    echo "usage: $0 ingest|ledger|storage|pipeline|budget|query" >&2
    exit 2
    ;;
esac
