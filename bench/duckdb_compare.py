#!/usr/bin/env python3
"""Runs the query benchmark's three reports through DuckDB over the same Parquet files, in the
same run, and prints DuckDB's latencies and the ratio tally/DuckDB.

Usage: bench/duckdb_compare.py <bench dir>   (the directory `cargo bench -p tally-query --bench
query` printed; it holds results.json). `scripts/bench.sh query` runs both.
"""
import json
import statistics
import sys
import time

import duckdb

bench = sys.argv[1]
r = json.load(open(f"{bench}/results.json"))
root, big, runs = r["root"], r["big_tenant"], r["runs"]
# The tenants of a partition share its files: a tenant's query reads its partition's files and
# filters on the tenant_id column, as the service does.
unit = r["big_unit"]
month = "WHERE bucket_start >= TIMESTAMPTZ '2026-11-01 00:00:00+00' AND bucket_start < TIMESTAMPTZ '2026-12-01 00:00:00+00'"
queries = {
    # The same SQL over the same files the service reads: the daily roll-ups (UTC).
    "tenant_monthly_report": f"""
        SELECT date, agent_id, action, currency, sum(events), sum(cost_micros), sum(input_tokens), sum(output_tokens)
        FROM read_parquet('{root}/daily/partition={unit}/month=2026-11/*.parquet')
        WHERE tenant_id = '{big}' AND zone = 'UTC' AND date >= DATE '2026-11-01' AND date < DATE '2026-12-01'
        GROUP BY ALL""",
    "billing_spend": f"""
        SELECT tenant_id, currency, charge_basis, corrects_period IS NOT NULL,
               sum(events), sum(cost_micros), sum(charge_micros), sum(input_tokens), sum(output_tokens)
        FROM read_parquet('{root}/billing/*/month=2026-11/*.parquet', hive_partitioning = true)
        GROUP BY ALL""",
    "audit_page": f"""
        SELECT * FROM read_parquet('{root}/events/partition={unit}/*/*.parquet')
        WHERE tenant_id = '{big}' AND seq > {r['page_after']} ORDER BY seq LIMIT 1000""",
    # For reference: the report from the 15-minute roll-ups (reports in zones without daily
    # roll-ups, or by task) and from raw rows (what a DuckDB user without roll-ups would run).
    "tenant_monthly_report_15min": f"""
        SELECT CAST(timezone('UTC', bucket_start) AS DATE) AS day, agent_id, action, currency,
               sum(events), sum(cost_micros), sum(input_tokens), sum(output_tokens)
        FROM read_parquet('{root}/rollups/partition={unit}/month=2026-11/*.parquet') {month} AND tenant_id = '{big}'
        GROUP BY ALL""",
    "tenant_monthly_report_raw_rows": f"""
        SELECT CAST(timezone('UTC', occurred_at) AS DATE) AS day, agent_id, action, currency,
               count(*), sum(cost_micros), sum(input_tokens), sum(output_tokens)
        FROM read_parquet('{root}/events/partition={unit}/*/*.parquet')
        WHERE tenant_id = '{big}' AND record_type = 'event' AND occurred_at >= TIMESTAMPTZ '2026-11-01 00:00:00+00'
          AND occurred_at < TIMESTAMPTZ '2026-12-01 00:00:00+00'
        GROUP BY ALL""",
}
if r.get("small_tenant"):
    # The median tenant of a Zipf run (`--sizes zipf`): a small tenant's report.
    queries["small_tenant_monthly_report"] = (
        queries["tenant_monthly_report"].replace(f"partition={unit}/", f"partition={r['small_unit']}/").replace(f"'{big}'", f"'{r['small_tenant']}'")
    )
con = duckdb.connect()
con.execute("SET threads = 2")
print(f"{'DuckDB ' + duckdb.__version__:<32} {'p50':>9} {'p90':>9}   tally p50 / DuckDB p50")
for name, sql in queries.items():
    con.execute(sql).fetchall()  # warm-up, as the Rust side does
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        con.execute(sql).fetchall()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p50 = statistics.median(samples)
    p90 = samples[round((len(samples) - 1) * 0.9)]
    ours = r.get(f"{name}_p50_ms")
    ratio = f"{ours / p50:.2f}x" if ours else "(no tally equivalent)"
    print(f"{name:<32} {p50:>9.1f} {p90:>9.1f}   {ratio}")
print(f"files in the projection: {r.get('files', '?')}")
print(f"bytes/event on disk (events tree): {r['events_bytes'] / r['events']:.1f}; with both roll-up trees: {(r['events_bytes'] + r['rollup_bytes']) / r['events']:.1f}")
