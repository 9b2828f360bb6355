#!/usr/bin/env bash
# The main job, end to end on one machine: start the pinned broker (unless KAFKA_BOOTSTRAP points
# at a running Kafka), publish the sample events from schemas/examples/ (valid and invalid), consume
# them, and print a per-tenant summary and what went to the dead-letter queue.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --locked --bin tally
TALLY=${CARGO_TARGET_DIR:-target}/debug/tally

if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  trap 'scripts/kafka.sh stop' EXIT
  KAFKA_BOOTSTRAP=$(scripts/kafka.sh start)
  export KAFKA_BOOTSTRAP
fi
run=$(date +%s)
topic=demo.events.$run

work=$(mktemp -d)
# One JSONL line per example file that has a tenant to key by (a bare array has none).
python3 - "$work/events.jsonl" <<'PY'
import glob, json, sys
with open(sys.argv[1], "w") as out:
    for path in sorted(glob.glob("schemas/examples/valid/*.json") + glob.glob("schemas/examples/invalid/*.json")):
        value = json.load(open(path))
        if isinstance(value, dict) and isinstance(value.get("tenant_id"), str):
            out.write(json.dumps(value, separators=(",", ":")) + "\n")
PY

echo "== creating topics"
"$TALLY" topics --events-topic "$topic" --partitions 4
echo "== publishing $(wc -l <"$work/events.jsonl") sample events to $topic"
"$TALLY" publish --topic "$topic" "$work/events.jsonl"
echo "== consuming"
"$TALLY" consume --topic "$topic" --group "demo-$run" --from-beginning --idle-exit 3
