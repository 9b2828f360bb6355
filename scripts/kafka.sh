#!/usr/bin/env bash
# Local Kafka-compatible broker for development and CI: Tansu, pinned (ARCHITECTURE.md, "Local broker").
#
#   scripts/kafka.sh install          build the pinned Tansu into the cache once (about 10 min cold)
#   scripts/kafka.sh start            start it (sqlite storage), create the topics, print the
#                                     bootstrap address
#
# Storage is always sqlite://: Tansu 0.6.0's memory:// engine returns nothing when a fetch starts
# inside a record batch, so a consumer resuming from its own offsets (the ledger) would stall or
# skip records. sqlite:// serves such fetches correctly and survives its own kill -9.
#   scripts/kafka.sh stop             stop it (SIGTERM, then SIGKILL after 10 s)
#   scripts/kafka.sh status           print the bootstrap address if it answers
#
# With KAFKA_BOOTSTRAP set, start and status use that broker and never touch Tansu; stop only
# ever stops a Tansu that `start` launched (recorded in its pidfile).
# Settings (environment): TALLY_BROKER_PORT (9092), TALLY_BROKER_DATA (.tally/kafka),
# TALLY_CACHE (~/.cache/tally), TALLY_BROKER_PARTITIONS (8).
set -euo pipefail

TANSU_VERSION=0.6.0
CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
TANSU_ROOT=$CACHE/tansu-$TANSU_VERSION
TANSU=$TANSU_ROOT/bin/tansu
PORT=${TALLY_BROKER_PORT:-9092}
DATA=${TALLY_BROKER_DATA:-$(pwd)/.tally/kafka}
PARTITIONS=${TALLY_BROKER_PARTITIONS:-8}
PIDFILE=$DATA/tansu.pid
ADDR=127.0.0.1:$PORT

log() { echo "kafka.sh: $*" >&2; }

install() {
  if [ -x "$TANSU" ] && "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return 0
  fi
  log "installing tansu $TANSU_VERSION into $TANSU_ROOT (one-time build, about 10 minutes)"
  mkdir -p "$CACHE"
  cargo install --locked tansu --version "$TANSU_VERSION" --features dynostore,libsql \
    --root "$TANSU_ROOT" >"$CACHE/tansu-install.log" 2>&1 || {
    tail -n 30 "$CACHE/tansu-install.log" >&2
    log "tansu install failed; full log in $CACHE/tansu-install.log"
    exit 1
  }
}

# Succeeds when the broker answers a metadata request.
answers() {
  "$TANSU" topic list --broker "tcp://$1" >/dev/null 2>&1
}

create_topics() {
  local broker=tcp://$1
  "$TANSU" topic create --broker "$broker" --partitions "$PARTITIONS" tally.events >/dev/null 2>&1 || true
  "$TANSU" topic create --broker "$broker" --partitions "$PARTITIONS" tally.events.dlq >/dev/null 2>&1 || true
  "$TANSU" topic create --broker "$broker" --partitions "$PARTITIONS" --config cleanup.policy=compact \
    tally.budget >/dev/null 2>&1 || true
  local have
  have=$("$TANSU" topic list --broker "$broker" 2>/dev/null)
  for t in tally.events tally.events.dlq tally.budget; do
    echo "$have" | grep -q "\"name\":\"$t\"" || { log "topic $t was not created"; exit 1; }
  done
}

start() {
  if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then
    echo "$KAFKA_BOOTSTRAP"
    return 0
  fi
  install
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    answers "$ADDR" && { echo "$ADDR"; return 0; }
  fi
  mkdir -p "$DATA"
  # Tansu resolves a sqlite path relative to its working directory.
  local url=sqlite://tansu.db
  (
    cd "$DATA"
    exec "$TANSU" broker --listener-url "tcp://$ADDR" --advertised-listener-url "tcp://$ADDR" \
      --storage-engine "$url" >"$DATA/tansu.log" 2>&1
  ) &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do
    if answers "$ADDR"; then
      create_topics "$ADDR"
      log "tansu $TANSU_VERSION up on $ADDR (sqlite storage, data in $DATA)"
      echo "$ADDR"
      return 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 0.1
  done
  log "tansu did not come up; last lines of $DATA/tansu.log:"
  tail -n 20 "$DATA/tansu.log" >&2 || true
  exit 1
}

stop() {
  # Acts only on a broker this script started (its pidfile), never on an external KAFKA_BOOTSTRAP;
  # callers export KAFKA_BOOTSTRAP after `start`, so the variable must not decide this.
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  log "tansu stopped"
}

status() {
  local addr=${KAFKA_BOOTSTRAP:-$ADDR}
  if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then echo "$addr"; return 0; fi
  install
  answers "$addr" && { echo "$addr"; return 0; }
  log "no broker answers on $addr"
  exit 1
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
