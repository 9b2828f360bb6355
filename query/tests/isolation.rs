//! The isolation attack suite (docs/http-api.md, the role matrix): a tenant's token tries, every way we could think of, to
//! read or infer another tenant's data or to write anything. Each attempt must be answered with
//! a clear JSON error (or, for queries that are legal, with the caller's own rows only), no
//! response may hold a byte of the other tenant's data, and the data directory must be unchanged.

mod common;

use axum::http::StatusCode;
use common::{event, send, Fixture};

/// Strings only the victim's data holds.
const SECRETS: [&str; 4] = ["globex", "g-secret", "classified-agent", "EUR"];

fn fixture() -> Fixture {
    let f = Fixture::new();
    let at = |m: i64| "2026-11-02T10:00:00Z".parse::<jiff::Timestamp>().unwrap() + jiff::SignedDuration::from_mins(m);
    let mut events: Vec<_> = (0..20).map(|i| event("acme", &format!("a-{i}"), at(i), "llm_call", "helper", "gpt-x", "t1", Some((100, "USD")))).collect();
    events.extend((0..20).map(|i| event("globex", &format!("g-secret-{i}"), at(i), "tool_call", "classified-agent", "search", "t9", Some((999, "EUR")))));
    f.ingest(&events);
    f
}

enum Expect {
    /// Refused with this status and a JSON error body.
    Refused(StatusCode),
    /// Refused with any 4xx status and a JSON error body.
    AnyRefusal,
    /// Answered (legal query), with the caller's rows only.
    OwnRowsOnly,
}

struct Attempt {
    method: &'static str,
    uri: String,
    body: Option<serde_json::Value>,
    expect: Expect,
}

fn get(uri: &str, expect: Expect) -> Attempt {
    Attempt { method: "GET", uri: uri.to_string(), body: None, expect }
}

fn sql(q: &str, expect: Expect) -> Attempt {
    Attempt { method: "POST", uri: "/v1/tenants/acme/sql".into(), body: Some(serde_json::json!({ "sql": q })), expect }
}

fn attempts(root: &str) -> Vec<Attempt> {
    use Expect::*;
    let forbidden = || Refused(StatusCode::FORBIDDEN);
    let rejected = || Refused(StatusCode::BAD_REQUEST);
    let mut v = vec![
        // Other tenants' ids, on every route, existing or not (same refusal: nothing to probe).
        get("/v1/tenants/globex/events", forbidden()),
        get("/v1/tenants/globex/costs?from=2026-11-01&to=2026-11-30", forbidden()),
        get("/v1/tenants/globex/audit-export", forbidden()),
        Attempt { method: "POST", uri: "/v1/tenants/globex/sql".into(), body: Some(serde_json::json!({"sql": "SELECT * FROM events"})), expect: forbidden() },
        get("/v1/tenants/no-such-tenant/events", forbidden()),
        get("/v1/tenants/GLOBEX/events", forbidden()),
        get("/v1/tenants/globex%00/events", forbidden()),
        get("/v1/tenants/acme,globex/events", forbidden()),
        get("/v1/tenants/*/events", forbidden()),
        get("/v1/spend?period=2026-11", forbidden()),
        // Traversal, plain and URL-encoded.
        get("/v1/tenants/..%2Fglobex/events", forbidden()),
        get("/v1/tenants/%2e%2e/events", forbidden()),
        get("/v1/tenants/acme%2F..%2F..%2Fevents%2Ftenant_id%3Dglobex/events", forbidden()),
        get("/v1/tenants/tenant_id%3Dglobex/events", forbidden()),
        get("/v1/tenants/acme/../globex/events", AnyRefusal),
        get("/v1/tenants/acme/events/../../globex/events", AnyRefusal),
        get("/v1/tenants/%252e%252e%252fglobex/events", forbidden()),
        // Parameters that try to widen or redirect a report.
        get("/v1/tenants/acme/events?tenant=globex", rejected()),
        get("/v1/tenants/acme/events?tenant_id=globex", rejected()),
        get("/v1/tenants/acme/events?kind=x'%20OR%20'1'='1", OwnRowsOnly),
        get("/v1/tenants/acme/events?agent=classified-agent", OwnRowsOnly),
        get("/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-30&group_by=tenant", rejected()),
        get("/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-30&tz=../../etc/passwd", rejected()),
        get("/v1/tenants/acme/audit-export?from_seq=0&to_seq=99999", rejected()),
        get("/v1/tenants/acme/events?limit=100000000", rejected()),
        get("/v1/tenants/acme/events?format=../../x", rejected()),
    ];
    let refused_sql = [
        "SELECT * FROM read_parquet('{root}/events/partition=tally.events-0')".to_string(),
        "SELECT * FROM read_csv('/etc/passwd')".into(),
        "SELECT * FROM read_json('{root}/events/partition=tally.events-0/_projection.json')".into(),
        "SELECT * FROM '{root}/events/partition=tally.events-0/'".into(),
        "SELECT * FROM 'file://{root}/events/partition=tally.events-0/'".into(),
        "SELECT * FROM \"{root}/events/partition=tally.events-0\"".into(),
        "CREATE EXTERNAL TABLE g STORED AS PARQUET LOCATION '{root}/events/partition=tally.events-0/'".into(),
        "CREATE TABLE g AS SELECT * FROM events".into(),
        "CREATE VIEW g AS SELECT * FROM events".into(),
        "COPY events TO '/tmp/tally-leak.parquet'".into(),
        "COPY (SELECT * FROM events) TO '{root}/events/partition=tally.events-0/x.parquet'".into(),
        "INSERT INTO events SELECT * FROM events".into(),
        "DELETE FROM events".into(),
        "UPDATE events SET cost_micros = 0".into(),
        "DROP TABLE events".into(),
        "SELECT * FROM information_schema.tables".into(),
        "SELECT * FROM information_schema.columns".into(),
        "SELECT * FROM datafusion.information_schema.tables".into(),
        "SHOW TABLES".into(),
        "SHOW ALL".into(),
        "DESCRIBE events".into(),
        "EXPLAIN SELECT * FROM events".into(),
        "EXPLAIN ANALYZE SELECT * FROM events".into(),
        "SET datafusion.catalog.information_schema = true".into(),
        "SELECT * FROM events UNION ALL SELECT * FROM globex".into(),
        "SELECT * FROM events UNION SELECT * FROM read_parquet('{root}/events/partition=tally.events-0')".into(),
        "SELECT * FROM datafusion.public.events".into(),
        "SELECT * FROM public.events".into(),
        "WITH g AS (SELECT * FROM read_parquet('{root}/events')) SELECT * FROM g".into(),
        "SELECT * FROM events e, LATERAL read_parquet('{root}') x".into(),
        "SELECT * FROM generate_series(1, 10)".into(),
        "SELECT * FROM range(1000000000000)".into(),
        "SELECT 1; SELECT * FROM globex".into(),
        "SELECT * FROM events -- \n; DROP TABLE events".into(),
        "PREPARE p AS SELECT * FROM events".into(),
        "SELECT * FROM events WHERE tenant_id = 'globex'".into(),
        // Statistics and metadata of the shared files: no function reads them.
        "SELECT * FROM parquet_metadata('{root}/events/partition=tally.events-0/')".into(),
        "SELECT * FROM parquet_schema('{root}/events/partition=tally.events-0/')".into(),
        "SELECT * FROM events WHERE input_file_name() LIKE '%'".into(),
        "SELECT arrow_metadata(tenant_id) FROM events".into(),
        "SELECT no_such_column FROM events".into(),
        "SELECT * FROM events AS OF '2026-01-01'".into(),
        "SELECT * FROM (SELECT * FROM events) JOIN globex USING (seq)".into(),
        "SELECT * FROM events WHERE seq IN (SELECT seq FROM globex)".into(),
        format!("SELECT {}1{}", "(".repeat(2000), ")".repeat(2000)),
        format!("SELECT 1 FROM events WHERE kind = '{}'", "x".repeat(70 * 1024)),
    ];
    v.extend(refused_sql.iter().map(|q| sql(&q.replace("{root}", root), Expect::AnyRefusal)));
    // Legal queries still see only the caller's rows.
    for q in [
        "SELECT * FROM events",
        "SELECT DISTINCT agent_id, currency FROM events",
        "SELECT count(*) AS n FROM events WHERE kind = 'tool_call'",
        "SELECT * FROM events WHERE event_id LIKE 'g-%' OR agent_id = 'classified-agent'",
        "WITH x AS (SELECT * FROM events) SELECT * FROM x UNION ALL SELECT * FROM events",
    ] {
        v.push(sql(q, Expect::OwnRowsOnly));
    }
    v
}

#[tokio::test]
async fn fifty_plus_attacks_leak_nothing_and_write_nothing() {
    let f = fixture();
    let r = f.router();
    let token = &f.tokens["acme"];
    let root = f.data_dir().join("parquet").display().to_string();
    let before = f.snapshot();
    let attempts = attempts(&root);
    assert!(attempts.len() >= 50, "{} attempts", attempts.len());
    for a in &attempts {
        let (status, body) = send(&r, a.method, &a.uri, Some(token), a.body.clone()).await;
        let text = String::from_utf8_lossy(&body);
        let what = format!("{} {} {:?} -> {status} {}", a.method, a.uri, a.body, &text[..text.len().min(300)]);
        for secret in SECRETS {
            // The caller's own request text may be echoed in an error; the victim's data never.
            let echoed = a.uri.contains(secret) || a.body.as_ref().is_some_and(|b| b.to_string().contains(secret));
            assert!(echoed || !text.contains(secret), "leaked {secret:?}: {what}");
        }
        let asked_with_root = a.uri.contains(&root) || a.body.as_ref().is_some_and(|b| b.to_string().contains(&root));
        assert!(asked_with_root || !text.contains(&root), "leaked a server path: {what}");
        match a.expect {
            Expect::Refused(want) => assert_eq!(status, want, "{what}"),
            Expect::AnyRefusal => assert!(status.is_client_error(), "{what}"),
            Expect::OwnRowsOnly => assert_eq!(status, StatusCode::OK, "{what}"),
        }
        if status.is_client_error() && status != StatusCode::NOT_FOUND {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("not a JSON error: {what}"));
            assert!(json["error"]["code"].is_string() && json["error"]["message"].is_string(), "{what}");
        }
        if let Expect::OwnRowsOnly = a.expect {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            for row in json["rows"].as_array().unwrap() {
                assert!(!row.to_string().contains("globex") && !row.to_string().contains("g-secret"), "{what}");
            }
        }
    }
    assert_eq!(f.snapshot(), before, "an attempt changed the data directory");
    assert!(!std::path::Path::new("/tmp/tally-leak.parquet").exists());
}

#[tokio::test]
async fn queries_past_their_time_or_row_limits_are_stopped_with_a_clear_error() {
    let f = fixture();
    let mut config = f.config();
    config.query_timeout_ms = 200;
    let r = tally_query::router_for_tests(config).unwrap();
    let token = &f.tokens["acme"];
    let explode = "SELECT sum(a.seq + b.seq + c.seq + d.seq + e.seq + f.seq + g.seq) FROM events a, events b, events c, events d, events e, events f, events g";
    let (status, body) = send(&r, "POST", "/v1/tenants/acme/sql", Some(token), Some(serde_json::json!({ "sql": explode }))).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "query_timeout");

    // The row limit, on a service of its own: the timed-out query's work runs on until its next
    // yield, and a 200 ms limit would measure that, not the row limit.
    let mut config = f.config();
    config.max_rows = 5;
    let r = tally_query::router_for_tests(config).unwrap();
    let (status, body) = send(&r, "POST", "/v1/tenants/acme/sql", Some(token), Some(serde_json::json!({ "sql": "SELECT seq FROM events ORDER BY seq" }))).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((json["rows"].as_array().unwrap().len(), json["truncated"].as_bool()), (5, Some(true)));

    let mut config = f.config();
    config.query_memory_mb = 16;
    let r = tally_query::router_for_tests(config).unwrap();
    // `||` is refused (its output is not bounded); `concat` is the bounded spelling.
    let hog = "SELECT concat(a.event_id, b.event_id, c.event_id, d.event_id, e.event_id) AS k, count(*) FROM events a, events b, events c, events d, events e GROUP BY k";
    let (status, body) = send(&r, "POST", "/v1/tenants/acme/sql", Some(token), Some(serde_json::json!({ "sql": hog }))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "query_too_large");
}

/// The tenants of a partition share their files (docs/parquet.md), so the restriction to the
/// caller's rows sits below SQL, in the table itself: no predicate, cast, aggregate or error can
/// reach a row of another tenant of the same file, nor name the `tenant_id` column.
#[tokio::test]
async fn shared_files_show_a_tenant_only_its_rows_whatever_the_query() {
    let f = fixture();
    let r = f.router();
    let token = &f.tokens["acme"];
    let units = std::fs::read_dir(f.data_dir().join("parquet/events")).unwrap().count();
    assert_eq!(units, 1, "acme and globex share one partition's files: the attacks below need that");
    let query = |q: &str| {
        let r = r.clone();
        let body = serde_json::json!({ "sql": q });
        async move {
            let (status, body) = send(&r, "POST", "/v1/tenants/acme/sql", Some(token), Some(body)).await;
            (status, String::from_utf8_lossy(&body).to_string())
        }
    };
    // Exact answers: acme's 20 rows, seqs 0..=19, whatever the predicate's logic.
    for (q, want) in [
        ("SELECT count(*) AS n FROM events", 20),
        ("SELECT count(*) AS n FROM events WHERE seq >= 0 OR seq IS NULL OR NOT (seq >= 0)", 20),
        ("SELECT count(*) AS n FROM events WHERE true OR NULL", 20),
        ("SELECT count(*) AS n FROM events WHERE NOT (kind = 'llm_call') IS NOT FALSE", 0),
        ("SELECT count(DISTINCT event_id) AS n FROM events", 20),
        ("SELECT max(seq) + 1 AS n FROM events", 20),
        ("SELECT count(*) AS n FROM (SELECT * FROM events UNION ALL SELECT * FROM events WHERE currency = 'EUR')", 20),
        ("SELECT count(*) AS n FROM events a JOIN events b ON a.seq = b.seq", 20),
        // Evaluated on the caller's rows only: on another tenant's row the cast would fail and
        // the error would quote its value.
        ("SELECT count(*) AS n FROM events WHERE CASE WHEN event_id LIKE 'g-%' THEN CAST(event_id AS INT) ELSE 0 END = 0", 20),
        ("SELECT count(*) AS n FROM events WHERE CASE WHEN currency = 'EUR' THEN 1 / 0 ELSE 1 END = 1", 20),
        // A sort the optimizer could move below the restriction would evaluate its key on every
        // tenant's rows.
        ("SELECT count(*) AS n FROM (SELECT * FROM events ORDER BY CASE WHEN event_id LIKE 'g-%' THEN CAST(event_id AS INT) ELSE 0 END)", 20),
        ("SELECT max(r) AS n FROM (SELECT row_number() OVER (ORDER BY seq) AS r FROM events)", 20),
        ("SELECT count(*) AS n FROM (SELECT seq FROM events ORDER BY event_id)", 20),
    ] {
        let (status, text) = query(q).await;
        assert_eq!(status, StatusCode::OK, "{q}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["rows"][0]["n"], want, "{q}: {text}");
    }
    // The column does not exist for the caller, in any spelling; errors that quote values quote
    // only the caller's.
    for q in [
        "SELECT tenant_id FROM events",
        "SELECT \"TENANT_ID\" FROM events",
        "SELECT * FROM events WHERE tenant_id = 'globex' OR true",
        "SELECT * FROM events WHERE CAST(tenant_id AS VARCHAR) COLLATE \"C\" = 'globex'",
        "SELECT CAST(event_id AS INT) FROM events",
        "SELECT arrow_cast(event_id, 'Int64') FROM events WHERE seq >= 0",
        "SELECT * FROM events WHERE CAST(event_id AS INT) > 0",
    ] {
        let (status, text) = query(q).await;
        assert!(status.is_client_error(), "{q}: {status} {text}");
        for secret in SECRETS {
            assert!(!text.contains(secret), "{q} leaked {secret}: {text}");
        }
    }
}
