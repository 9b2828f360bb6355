#!/usr/bin/env bash
# The main job, end to end on one machine: start the pinned broker (unless KAFKA_BOOTSTRAP points
# at a running Kafka), publish the sample events from schemas/examples/ (valid and invalid) plus a
# small generated batch, print a per-tenant summary and what went to the dead-letter queue, run the
# ledger service over them, fetch one tenant's receipt over HTTP with its bearer token and verify
# it offline with `tally verify`, drive a tenant past its budget, show a gateway's retried,
# throttled and frozen calls, then start the query service over the ledger's Parquet projection
# and print a tenant's cost report, the billing spend (a tokens-only call charged from its
# tenant's price table), a billing statement verified offline from the ledger's tiles and from an
# audit export, the invoices of the tenants' own billing periods, an end user's erasure after
# which a receipt issued before still verifies, and the tenant's audit export verified offline
# (with `tally verify export` and with the Python reference verifier).
#
# TALLY_BIN=<path> uses an already built binary (the test suite does); otherwise it builds one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${TALLY_BIN:-}" ]; then
  TALLY=$TALLY_BIN
else
  cargo build --quiet --locked --bin tally
  TALLY=${CARGO_TARGET_DIR:-target}/debug/tally
fi

LEDGER_PID=
QUERY_PID=
cleanup() {
  if [ -n "$QUERY_PID" ]; then kill -TERM "$QUERY_PID" 2>/dev/null && wait "$QUERY_PID" 2>/dev/null || true; fi
  if [ -n "$LEDGER_PID" ]; then kill -TERM "$LEDGER_PID" 2>/dev/null && wait "$LEDGER_PID" 2>/dev/null || true; fi
  if [ -n "${STARTED_BROKER:-}" ]; then scripts/kafka.sh stop; fi
}
trap cleanup EXIT
if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  STARTED_BROKER=1
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
    # A few dozen more calls, so the logs have some depth.
    for i in range(60):
        tenant = ["acme", "globex", "initech"][i % 3]
        event = {"event_id": f"demo-{i}", "tenant_id": tenant, "occurred_at": "2026-11-02T09:%02d:00Z" % (i % 60),
                 "kind": "llm_call", "action": "gpt-5-mini", "agent_id": "support-bot",
                 "cost": {"amount_micros": 1200 + i, "currency": "USD"}}
        # Two of acme's calls act for an end user: personal data, which the ledger commits to.
        if i in (0, 3):
            event.update({"actor_id": "user-ann", "attributes": {"email": "ann@example.com"}})
        out.write(json.dumps(event) + "\n")
    # A call that reports tokens but no cost: the ledger prices it from initech's table.
    out.write(json.dumps({"event_id": "demo-tokens-only", "tenant_id": "initech", "occurred_at": "2026-11-02T10:30:00Z", "kind": "llm_call",
                          "action": "gpt-5-mini", "agent_id": "support-bot", "usage": {"input_tokens": 20000, "output_tokens": 2000}}) + "\n")
    # December's first calls: the ledger's input clock (the events' own times) passes November's
    # end, so each tenant's November is closed by a statement before its December call.
    for tenant in ["acme", "globex", "initech"]:
        out.write(json.dumps({"event_id": "demo-december-" + tenant, "tenant_id": tenant, "occurred_at": "2026-12-01T00:30:00Z", "kind": "llm_call",
                              "action": "gpt-5-mini", "agent_id": "support-bot", "cost": {"amount_micros": 1000, "currency": "USD"}}) + "\n")
PY

echo "== creating topics"
"$TALLY" topics --events-topic "$topic" --partitions 4
echo "== publishing $(wc -l <"$work/events.jsonl") sample events to $topic"
"$TALLY" publish --topic "$topic" "$work/events.jsonl"
echo "== consuming"
RUST_LOG=${RUST_LOG:-error} "$TALLY" consume --topic "$topic" --group "demo-$run" --from-beginning --idle-exit 3

echo "== running the ledger service over $topic"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$TALLY" keygen --origin demo.tally.example --out "$work/ledger.key" >/dev/null
acme_token=$("$TALLY" token new --name acme-app --role tenant --tenant acme --file "$work/tokens.toml" 2>/dev/null)
initech_token=$("$TALLY" token new --name initech-gateway --role tenant --tenant initech --file "$work/tokens.toml" 2>/dev/null)
billing_token=$("$TALLY" token new --name billing-system --role billing --file "$work/tokens.toml" 2>/dev/null)
# A gateway in front of globex (admission and budget state only; no audit reads), and an
# operator, both with an expiry.
gateway_token=$("$TALLY" token new --name globex-gateway --role gateway --tenant globex --expires-in 30d --file "$work/tokens.toml" 2>/dev/null)
ops_token=$("$TALLY" token new --name ops --role admin --expires-in 1d --file "$work/tokens.toml" 2>/dev/null)
# initech's plan: \$0.05 a day; models priced per million tokens, unknown ones at the ceiling.
cat >"$work/budgets.toml" <<'TOML'
[plans.starter]
day_micros = 50_000
soft_threshold = 0.8
ceiling = { input_per_million_micros = 10_000_000, output_per_million_micros = 30_000_000 }
[plans.starter.prices."gpt-5-mini"]
input_per_million_micros = 250_000
output_per_million_micros = 2_000_000
[tenants.initech]
plan = "starter"
# globex has no money limit, but its mailer may send 2 emails a day.
[tenants.globex.quotas]
"action:send_email" = "2/d"
TOML
cat >"$work/ledger.toml" <<TOML
[kafka]
bootstrap = "$KAFKA_BOOTSTRAP"
[ledger]
data_dir = "$work/ledger"
keys = ["$work/ledger.key"]
topic = "$topic"
group = "demo-ledger-$run"
listen = "127.0.0.1:$port"
tokens = "$work/tokens.toml"
budgets = "$work/budgets.toml"
# Close a billing period as soon as it ends on the input's clock (default: a day later), so
# December's first calls close November.
statement_grace_ms = 0
TOML
RUST_LOG=warn "$TALLY" --config "$work/ledger.toml" ledger 2>"$work/ledger.log" &
LEDGER_PID=$!
base=http://127.0.0.1:$port
auth=(-H "Authorization: Bearer $acme_token")
# December's first calls close November (statement_grace_ms = 0): wait until acme's statement is
# there and its signed size has stopped growing for a second.
size= last= statements=0
for _ in $(seq 1 120); do
  size=$(curl -sf "${auth[@]}" "$base/t/acme/checkpoint" | sed -n 2p || true)
  statements=$(curl -sf "${auth[@]}" "$base/v1/tenants/acme/statements" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["statements"]))' || echo 0)
  if [ -n "$size" ] && [ "$size" = "$last" ] && [ "$statements" -gt 0 ]; then break; fi
  last=$size
  sleep 1
done
[ -n "$size" ] || { echo "the ledger did not sign a checkpoint for acme; log:"; cat "$work/ledger.log"; exit 1; }
events=$((size - statements))
echo "acme's signed checkpoint covers its $size records: $events valid events (the invalid samples went to the DLQ) and $statements statement closing November:"
curl -sf "${auth[@]}" "$base/t/acme/checkpoint" | sed 's/^/    /'

echo "== fetching acme's receipt for its latest record and verifying it offline"
seq=$((size - 1))
curl -sf "${auth[@]}" "$base/v1/tenants/acme/receipt/$seq" >"$work/acme.tlog-proof"
curl -sf "${auth[@]}" "$base/v1/tenants/acme/records/$seq" >"$work/acme.entry"
vkey=$("$TALLY" vkey --key "$work/ledger.key" --tenant acme)
echo "vkey: $vkey"
"$TALLY" verify receipt --vkey "$vkey" --receipt "$work/acme.tlog-proof" --entry "$work/acme.entry"

echo "== acme's token cannot read globex"
curl -s "${auth[@]}" "$base/t/globex/checkpoint"
echo

echo "== budgets: initech may spend \$0.05 a day; its gateway spends \$0.012 a call"
for i in 1 2 3 4 5; do
  printf '{"event_id":"spend-%s","tenant_id":"initech","occurred_at":"%s","kind":"llm_call","action":"gpt-5-mini","task_id":"ticket-42","cost":{"amount_micros":12000,"currency":"USD"}}\n' \
    "$i" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done >"$work/spend.jsonl"
"$TALLY" publish --topic "$topic" "$work/spend.jsonl" >/dev/null
iauth=(-H "Authorization: Bearer $initech_token")
status=
for _ in $(seq 1 60); do
  status=$(curl -sf "${iauth[@]}" "$base/v1/tenants/initech/budget" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' || true)
  [ "$status" = exceeded ] && break
  sleep 0.5
done
echo "initech's budget state (also on the tally.budget topic): $status"
curl -sf "${iauth[@]}" "$base/v1/tenants/initech/budget" | python3 -c '
import json, sys
s = json.load(sys.stdin)
for l in s["levels"]:
    print("    %-6s %-10s spent %7d of %s micros, remaining %s" % (l["level"], l["scope"], l["spent_micros"], l.get("limit_micros", "-"), l.get("remaining_micros", "-")))'
echo "== the gateway asks before its next \$0.01 call"
curl -sf "${iauth[@]}" -X POST -H 'Content-Type: application/json' -d '{"task_id":"ticket-42","estimate_micros":10000}' \
  "$base/v1/tenants/initech/budget/authorize" | python3 -c '
import json, sys
v = json.load(sys.stdin)
print("authorize: %s (denied by the %s limit; decision recorded at seq %d of initech'"'"'s log)" % (v["decision"], v["denied_by"], v["seq"]))'

echo "== globex's gateway: rate quotas, a retried call, and the kill switch"
gauth=(-H "Authorization: Bearer $gateway_token")
ask() { # ask <idempotency key> <agent>: one send_email authorize for globex, printed in a line
  curl -sf "${gauth[@]}" -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: $1" \
    -d "{\"agent_id\":\"$2\",\"action\":\"send_email\",\"kind\":\"tool_call\",\"estimate_micros\":0}" \
    -D "$work/headers" "$base/v1/tenants/globex/budget/authorize" | python3 -c '
import json, sys
v = json.load(sys.stdin)
replayed = "idempotent-replayed: true" in open(sys.argv[1]).read().lower()
if v["decision"] == "allow":
    extra = "reservation %s" % v["reservation_id"]
elif v["decision"] == "throttled":
    extra = "by %s, retry after %d ms" % (v["throttled_by"], v["retry_after_ms"])
else:
    extra = "denied by %s" % v["denied_by"]
print("    %-9s %s%s" % (v["decision"], extra, " (a retry: the first answer again)" if replayed else ""))' "$work/headers"
}
ask mail-1 mailer-bot
ask mail-1 mailer-bot
ask mail-2 mailer-bot
ask mail-3 mailer-bot
echo "the gateway's token cannot read globex's audit trail:"
curl -s "${gauth[@]}" "$base/t/globex/checkpoint"
echo
echo "an operator freezes globex's mailer-bot:"
freeze=$(curl -sf -H "Authorization: Bearer $ops_token" -X POST -H 'Content-Type: application/json' \
  -d '{"reason":"runaway emails","scope":{"agent_id":"mailer-bot"}}' "$base/v1/tenants/globex/freeze")
echo "    $freeze"
curl -sf "${gauth[@]}" "$base/v1/tenants/globex/budget" | python3 -c '
import json, sys
s = json.load(sys.stdin)
for f in s["freezes"]:
    print("    active freeze %s: %s, scope %s (also on the tally.budget topic)" % (f["freeze_id"], f["reason"], json.dumps(f.get("scope", {}))))
for q in s["quotas"]:
    print("    quota %s: %d of %d used, resets at %s" % (q["quota"], q["used"], q["limit"], q["resets_at"]))'
ask mail-4 mailer-bot
ask mail-5 report-bot

echo "== the query service over the ledger's Parquet projection"
qport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/query.toml" <<TOML
[query]
data_dir = "$work/ledger"
listen = "127.0.0.1:$qport"
tokens = "$work/tokens.toml"
TOML
RUST_LOG=warn "$TALLY" --config "$work/query.toml" query 2>"$work/query.log" &
QUERY_PID=$!
qbase=http://127.0.0.1:$qport
# The ledger projects each tenant's new records to Parquet every second.
for _ in $(seq 1 60); do
  rows=$(curl -sf "${auth[@]}" "$qbase/v1/tenants/acme/events?record_type=event&limit=1000" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["rows"]))' || true)
  [ "${rows:-0}" -ge "$events" ] && break
  sleep 0.5
done
echo "acme's audit trail holds $rows events; its cost report for November 2026 by day, agent and model:"
curl -sf "${auth[@]}" "$qbase/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-30&group_by=day,agent,action" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("    %-10s  %-12s  %-14s  %6s  %14s" % ("day", "agent", "model", "events", "charged (micros)"))
for row in r["rows"]:
    print("    %-10s  %-12s  %-14s  %6d  %14d" % (row["day"], row.get("agent_id") or "-", row.get("action") or "-", row["events"], row["charge_micros"]))
for t in r["totals"]:
    print("    total %s: %d events, %d micros charged" % (t.get("currency") or "(no currency)", t["events"], t["charge_micros"]))'
echo "== the billing system pulls every tenant's spend for 2026-11 (FOCUS columns)"
curl -sf -H "Authorization: Bearer $billing_token" "$qbase/v1/spend?period=2026-11" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("    %-12s  %-8s  %-8s  %12s  %8s  %-20s  %-20s" % ("SubAccountId", "Currency", "Basis", "BilledCost", "Events", "ChargePeriodStart", "ChargePeriodEnd"))
for row in r["rows"]:
    print("    %-12s  %-8s  %-8s  %12s  %8d  %-20s  %-20s" % (row["SubAccountId"], row.get("BillingCurrency") or "-", row.get("x_ChargeBasis") or "-", row["BilledCost"], row["ConsumedQuantity"], row["ChargePeriodStart"], row["ChargePeriodEnd"]))'
echo "== initech's costs by model: its tokens-only call is charged from its price table"
curl -sf "${iauth[@]}" "$qbase/v1/tenants/initech/costs?from=2026-11-01&to=2026-11-30&group_by=action" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("    %-12s  %6s  %14s  %14s" % ("model", "events", "claimed cost", "charged"))
for row in r["rows"]:
    print("    %-12s  %6d  %14d  %14d" % (row.get("action") or "-", row["events"], row["cost_micros"], row["charge_micros"]))'
echo "== initech's November statement, verified offline against the tiles the ledger serves"
for _ in $(seq 1 60); do
  statement=$(curl -sf "${iauth[@]}" "$base/v1/tenants/initech/statements" | python3 -c '
import json, sys
s = [x for x in json.load(sys.stdin)["statements"] if x["period"] == "2026-11-01"]
print(json.dumps(s[0]) if s else "")' || true)
  [ -n "$statement" ] && break
  sleep 0.5
done
[ -n "$statement" ] || { echo "no statement for initech's November; log:"; cat "$work/ledger.log"; exit 1; }
echo "$statement" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("    period %s .. %s (%s), seqs %d..%d, covers %d records" % (s["period_start"], s["period_end"], s["time_zone"], s["first_seq"], s["last_seq"], s["tree_size"]))
for t in s["totals"]:
    print("    %s %-8s %s%6d events  %10d micros" % (t["currency"], t["basis"], "correction " if t.get("correction") else "", t["events"], t["micros"]))'
statement_seq=$(echo "$statement" | python3 -c 'import json,sys; print(json.load(sys.stdin)["seq"])')
mkdir -p "$work/initech-tiles"
curl -sf "${iauth[@]}" "$base/t/initech/checkpoint" >"$work/initech-tiles/checkpoint"
python3 - "$work/initech-tiles" <<'PY' | while read -r tile; do curl -sf "${iauth[@]}" --create-dirs -o "$work/initech-tiles/$tile" "$base/t/initech/$tile"; done
import sys
size = int(open(sys.argv[1] + "/checkpoint").read().split("\n")[1])
for index in range((size + 255) // 256):
    width = min(256, size - index * 256)
    digits = "%03d" % (index % 1000)
    n = index // 1000
    while n:
        digits = "x%03d/%s" % (n % 1000, digits)
        n //= 1000
    print("tile/entries/" + digits + ("" if width == 256 else ".p/%d" % width))
PY
initech_vkey=$("$TALLY" vkey --key "$work/ledger.key" --tenant initech)
"$TALLY" verify statement --vkey "$initech_vkey" --tiles "$work/initech-tiles" --seq "$statement_seq"
echo "== the same statement, verified from initech's audit export (what a regulator is handed)"
# The export serves the projected log: wait until the projection holds the statement.
for _ in $(seq 1 60); do
  curl -sf "${iauth[@]}" "$qbase/v1/tenants/initech/audit-export?from_seq=0" >"$work/initech-export.json" || true
  python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["to_seq"] >= int(sys.argv[2]) else 1)' "$work/initech-export.json" "$statement_seq" 2>/dev/null && break
  sleep 0.5
done
"$TALLY" verify statement --vkey "$initech_vkey" --export "$work/initech-export.json" --seq "$statement_seq"
echo "== the billing system pulls the invoices of the billing periods starting in 2026-11 (closed by statements)"
curl -sf -H "Authorization: Bearer $billing_token" "$qbase/v1/spend?period=2026-11&calendar=billing" | python3 -c '
import json, sys
r = json.load(sys.stdin)
for row in r["rows"]:
    print("    invoice %-10s  %-4s %-8s %12s  %s .. %s  statement seq %d" % (row["SubAccountId"], row["BillingCurrency"], row["x_ChargeBasis"], row["BilledCost"], row["BillingPeriodStart"], row["BillingPeriodEnd"], row["x_StatementSeq"]))'
echo "== acme's user-ann asks to be forgotten (GDPR art. 17): erasure, and a receipt from before it still verifies"
ann_seq=$(curl -sf -D - -o "$work/ann.tlog-proof" "${auth[@]}" "$base/v1/tenants/acme/receipt?event_id=demo-0" | tr -d '\r' | sed -n 's/^x-tally-seq: //Ip')
curl -sf "${auth[@]}" "$base/v1/tenants/acme/records/$ann_seq" >"$work/ann.entry"
curl -sf "${auth[@]}" "$base/v1/tenants/acme/records/$ann_seq/personal" >"$work/ann.personal"
echo "record $ann_seq holds commitments, not values: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["personal"])' "$work/ann.entry")"
"$TALLY" verify receipt --vkey "$vkey" --receipt "$work/ann.tlog-proof" --entry "$work/ann.entry" --personal "$work/ann.personal"
curl -sf "${auth[@]}" -X POST -H 'Content-Type: application/json' -d '{"subject":"user-ann"}' "$base/v1/tenants/acme/erase" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("erased: %d key, the personal values of %d records; erasure record at seq %d; projection rewritten" % (r["keys"], r["records"], r["seq"]))'
curl -sf "${auth[@]}" "$base/v1/tenants/acme/records/$ann_seq/personal" >"$work/ann.erased"
"$TALLY" verify receipt --vkey "$vkey" --receipt "$work/ann.tlog-proof" --entry "$work/ann.entry" --personal "$work/ann.erased"
echo "the same, with the independent verifier (Python, standard library only):"
python3 verifiers/python/tally_verify.py receipt --vkey "$vkey" --receipt "$work/ann.tlog-proof" --entry "$work/ann.entry" --personal "$work/ann.erased" | sed 's/^/    /'
if grep -rqF "ann@example.com" "$work/ledger"; then echo "ann@example.com is still under the data directory"; exit 1; fi
echo "a byte scan of the ledger's data directory finds no ann@example.com"

echo "== acme's audit export proves its trail complete against the signed checkpoint, checked offline"
curl -sf "${auth[@]}" "$qbase/v1/tenants/acme/audit-export" >"$work/acme-export.json"
python3 -c '
import json, sys
e = json.load(open(sys.argv[1]))
print("audit export: seqs %d..%d of tree size %d, complete=%s, %d proof hashes" % (e["from_seq"], e["to_seq"], e["tree_size"], str(e["complete"]).lower(), len(e["range_proof"])))' "$work/acme-export.json"
"$TALLY" verify export --vkey "$vkey" "$work/acme-export.json"
echo "the same, with the independent verifier (Python, standard library only):"
python3 verifiers/python/tally_verify.py export --vkey "$vkey" "$work/acme-export.json" | sed 's/^/    /'
