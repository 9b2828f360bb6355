#!/usr/bin/env bash
# Runs every test: starts the pinned local broker (installing it into ~/.cache/tally once) unless
# KAFKA_BOOTSTRAP points at a running Kafka, runs the workspace tests against it, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

export TALLY_BROKER_DATA=${TALLY_BROKER_DATA:-$(mktemp -d "${TMPDIR:-/tmp}/tally-test-kafka.XXXXXX")}
if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  export TALLY_BROKER_PORT=${TALLY_BROKER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
  trap 'scripts/kafka.sh stop' EXIT
  KAFKA_BOOTSTRAP=$(scripts/kafka.sh start)
  export KAFKA_BOOTSTRAP
fi
echo "test.sh: broker at $KAFKA_BOOTSTRAP" >&2

# Hygiene first: formatting (rustfmt.toml) and every clippy warning, in all targets.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# Benches are built (so they cannot rot) but run only by scripts/bench.sh.
cargo build --workspace --benches --locked
cargo test --workspace --lib --bins --tests --locked "$@"

# Every fuzz target, briefly, over the committed corpora (scripts/fuzz.sh; docs/fuzzing.md).
scripts/fuzz.sh smoke
