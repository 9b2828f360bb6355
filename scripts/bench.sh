#!/usr/bin/env bash
# Benchmarks (never timed assertions in tests). `scripts/bench.sh ingest` starts the pinned broker
# unless KAFKA_BOOTSTRAP is set, runs the ingest benchmark, and stops the broker.
# `scripts/bench.sh ledger` runs the ledger's append/proof benchmark (no broker needed).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in
  ingest)
    if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
      export TALLY_BROKER_DATA=${TALLY_BROKER_DATA:-$(mktemp -d "${TMPDIR:-/tmp}/tally-bench-kafka.XXXXXX")}
      export TALLY_BROKER_PORT=${TALLY_BROKER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
      trap 'scripts/kafka.sh stop' EXIT
      KAFKA_BOOTSTRAP=$(scripts/kafka.sh start)
      export KAFKA_BOOTSTRAP
    fi
    cargo bench --locked -p tally-ingest --bench consume
    ;;
  ledger)
    cargo bench --locked -p tally-ledger --bench ledger
    ;;
  *)
    echo "usage: $0 ingest|ledger" >&2
    exit 2
    ;;
esac
