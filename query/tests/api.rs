//! The query API end to end over a real projection: audit-trail pages, formats, cost roll-ups,
//! billing spend, roles, and the audit export's completeness evidence.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{event, get_json, send, Fixture};
use jiff::Timestamp;

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// acme: 30 events over two days, two agents, two models, USD; globex: 5 events in EUR.
fn fixture() -> Fixture {
    let f = Fixture::new();
    let mut events = Vec::new();
    for i in 0..30 {
        let at = t("2026-11-01T22:00:00Z") + jiff::SignedDuration::from_mins(20 * i);
        let (agent, action) = if i % 3 == 0 { ("planner", "gpt-x") } else { ("coder", "claude-y") };
        events.push(event("acme", &format!("a-{i}"), at, "llm_call", agent, action, &format!("task-{}", i % 4), Some((1_000 + i, "USD"))));
    }
    for i in 0..5 {
        events.push(event(
            "globex",
            &format!("g-{i}"),
            t("2026-11-02T10:00:00Z"),
            "tool_call",
            "globex-secret-agent",
            "search",
            "g-task",
            Some((7_000_000, "EUR")),
        ));
    }
    f.ingest(&events);
    f
}

#[tokio::test]
async fn events_are_paged_by_seq_cursor_and_filtered() {
    let f = fixture();
    let r = f.router();
    let token = &f.tokens["acme"];
    assert_eq!(all_pages(&r, "/v1/tenants/acme/events?limit=7", token).await, (0..30).collect::<Vec<u64>>());

    let planner = get_json(&r, "/v1/tenants/acme/events?agent=planner&action=gpt-x", token).await;
    assert_eq!(planner["rows"].as_array().unwrap().len(), 10);
    let day2 = get_json(&r, "/v1/tenants/acme/events?from=2026-11-02&to=2026-11-02", token).await;
    let rows = day2["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r["occurred_at"].as_str().unwrap().starts_with("2026-11-02")), "{rows:?}");
    assert_eq!(rows.len(), 30 - 6, "the first 6 events (22:00..23:40 on the 1st) are outside");
    let (status, body) = send(&r, "GET", "/v1/tenants/acme/events?colour=blue", Some(token), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("colour"));
}

/// The seqs of every page of `uri`, following `next_cursor` (`&after=`); every row must carry
/// its leaf hash.
async fn all_pages(r: &axum::Router, uri: &str, token: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut next = uri.to_string();
    loop {
        let page = get_json(r, &next, token).await;
        let rows = page["rows"].as_array().unwrap();
        assert!(rows.iter().all(|r| r["leaf_hash"].is_string()), "every row carries its leaf hash");
        seqs.extend(rows.iter().map(|r| r["seq"].as_u64().unwrap()));
        match page["next_cursor"].as_u64() {
            Some(c) => next = format!("{uri}&after={c}"),
            None => return seqs,
        }
    }
}

/// A page reads only the first files after its cursor. Seq ranges of files overlap once a merge
/// joins one date's files across flushes while another date's stay apart; every page must still
/// be exactly the seq-ordered rows, filtered or not.
#[tokio::test]
async fn pages_over_interleaved_files_equal_the_whole_log() {
    let f = Fixture::new();
    // Ten flushes of five events; the 1st gets four or five rows from each (files of one size
    // tier, so they are merged), the 2nd every third flush's last event (seqs 4, 19, 34, 49).
    let on_day2 = |s: u64| s % 5 == 4 && (s / 5).is_multiple_of(3);
    for b in 0..10u64 {
        let events: Vec<_> = (b * 5..b * 5 + 5)
            .map(|s| {
                let at = if on_day2(s) { "2026-11-02T10:00:00Z" } else { "2026-11-01T10:00:00Z" };
                let agent = if s % 3 == 0 { "planner" } else { "coder" };
                event("acme", &format!("e{s}"), t(at), "llm_call", agent, "gpt-x", "task", Some((1, "USD")))
            })
            .collect();
        f.ingest(&events);
    }
    let day1 = f.data_dir().join("parquet/events/partition=tally.events-0/date=2026-11-01");
    let merged = std::fs::read_dir(&day1)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().split(['-', '.']).nth(2).is_some_and(|rows| rows.parse::<u64>().unwrap() > 5));
    assert!(merged, "the test needs a file that spans several flushes");
    let r = f.router();
    let token = &f.tokens["acme"];
    for limit in [1, 3, 4, 5, 7, 50, 100] {
        assert_eq!(all_pages(&r, &format!("/v1/tenants/acme/events?limit={limit}"), token).await, (0..50).collect::<Vec<u64>>(), "limit {limit}");
    }
    for limit in [1, 2, 3, 5, 17] {
        assert_eq!(
            all_pages(&r, &format!("/v1/tenants/acme/events?agent=planner&limit={limit}"), token).await,
            (0..50).filter(|s| s % 3 == 0).collect::<Vec<u64>>(),
            "limit {limit}"
        );
    }
    let day2 = all_pages(&r, "/v1/tenants/acme/events?from=2026-11-02&to=2026-11-02&limit=3", token).await;
    assert_eq!(day2, (0..50).filter(|&s| on_day2(s)).collect::<Vec<u64>>());
}

#[tokio::test]
async fn every_format_carries_the_same_rows() {
    let f = fixture();
    let r = f.router();
    let token = &f.tokens["acme"];
    let (status, csv) = send(&r, "GET", "/v1/tenants/acme/events?format=csv&limit=5", Some(token), None).await;
    assert_eq!(status, StatusCode::OK);
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert!(csv.lines().next().unwrap().starts_with("seq,leaf_hash,record_type,event_id"));

    let (_, parquet) = send(&r, "GET", "/v1/tenants/acme/events?format=parquet&limit=5", Some(token), None).await;
    let reader = datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(parquet)).unwrap().build().unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 5);

    let (_, arrow) = send(&r, "GET", "/v1/tenants/acme/events?format=arrow&limit=5", Some(token), None).await;
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow), None).unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 5);
}

#[tokio::test]
async fn costs_roll_up_by_any_dimensions_with_totals() {
    let f = fixture();
    let r = f.router();
    let token = &f.tokens["acme"];
    let all: i64 = (0..30).map(|i| 1_000 + i).sum();
    let report = get_json(&r, "/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-30&group_by=agent,action", token).await;
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    let planner: i64 = (0..30).filter(|i| i % 3 == 0).map(|i| 1_000 + i).sum();
    let row = rows.iter().find(|r| r["agent_id"] == "planner").unwrap();
    assert_eq!((row["action"].as_str(), row["cost_micros"].as_i64(), row["events"].as_i64()), (Some("gpt-x"), Some(planner), Some(10)));
    assert_eq!(report["totals"][0]["cost_micros"].as_i64(), Some(all));

    // By day in UTC and in Tokyo (UTC+9): the 22:00Z start is the 2nd in Tokyo.
    let utc = get_json(&r, "/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-03&group_by=day", token).await;
    let days: Vec<&str> = utc["rows"].as_array().unwrap().iter().map(|r| r["day"].as_str().unwrap()).collect();
    assert_eq!(days, vec!["2026-11-01", "2026-11-02"]);
    let tokyo = get_json(&r, "/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-03&group_by=day&tz=Asia/Tokyo", token).await;
    let days: Vec<&str> = tokyo["rows"].as_array().unwrap().iter().map(|r| r["day"].as_str().unwrap()).collect();
    assert_eq!(days, vec!["2026-11-02"]);
    assert_eq!(tokyo["totals"][0]["cost_micros"].as_i64(), Some(all));
    assert_eq!((utc["source"].as_str(), tokyo["source"].as_str()), (Some("daily"), Some("15-minute")), "the fixture keeps daily roll-ups for UTC, not Tokyo");

    let (status, body) = send(&r, "GET", "/v1/tenants/acme/costs?from=2026-11-01T00:07:00Z&to=2026-11-02", Some(token), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("15-minute"));
    let (status, _) = send(&r, "GET", "/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-02&group_by=colour", Some(token), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, csv) = send(&r, "GET", "/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-30&group_by=kind&format=csv", Some(token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        String::from_utf8(csv).unwrap(),
        format!("kind,currency,events,cost_micros,charge_micros,input_tokens,output_tokens\nllm_call,USD,30,{all},{all},90,150\n")
    );
}

#[tokio::test]
async fn billing_sees_every_tenants_spend_with_focus_columns_and_nobody_else_does() {
    let f = fixture();
    let r = f.router();
    let spend = get_json(&r, "/v1/spend?period=2026-11", &f.tokens["billing"]).await;
    let rows = spend["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{spend}");
    let acme = rows.iter().find(|r| r["SubAccountId"] == "acme").unwrap();
    let total: i64 = (0..30).map(|i| 1_000 + i).sum();
    assert_eq!(acme["x_ChargedMicros"].as_i64(), Some(total));
    assert_eq!(acme["BilledCost"].as_str(), Some(format!("0.{total:06}").as_str()));
    assert_eq!(
        (acme["BillingCurrency"].as_str(), acme["ChargePeriodStart"].as_str(), acme["ChargePeriodEnd"].as_str()),
        (Some("USD"), Some("2026-11-01T00:00:00Z"), Some("2026-12-01T00:00:00Z"))
    );
    let globex = rows.iter().find(|r| r["SubAccountId"] == "globex").unwrap();
    assert_eq!((globex["BilledCost"].as_str(), globex["BillingCurrency"].as_str()), (Some("35.000000"), Some("EUR")));
    let empty = get_json(&r, "/v1/spend?period=2026-10", &f.tokens["billing"]).await;
    assert_eq!(empty["rows"].as_array().unwrap().len(), 0);

    for who in ["acme", "regulator"] {
        let (status, body) = send(&r, "GET", "/v1/spend?period=2026-11", Some(&f.tokens[who]), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}");
        assert!(!String::from_utf8_lossy(&body).contains("globex"));
    }
    let (status, _) = send(&r, "GET", "/v1/tenants/acme/events", Some(&f.tokens["billing"]), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "billing reads spend, not audit trails");
    let (status, _) = send(&r, "GET", "/v1/spend?period=2026-11", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(&r, "GET", "/v1/spend?period=November", Some(&f.tokens["billing"]), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, csv) = send(&r, "GET", "/v1/spend?period=2026-11&format=csv", Some(&f.tokens["billing"]), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8(csv).unwrap().starts_with("BillingAccountId,BillingAccountName,BillingCurrency,"));
}

/// What bills is what the ledger charged: a tokens-only call priced from the table is a billing
/// line (its claimed cost 0), a late event's charge is a `Correction`, each basis and currency is
/// its own FOCUS row, and the cost report sums the same charges.
#[tokio::test]
async fn spend_and_costs_bill_the_recorded_charge_with_focus_columns() {
    use tally_log::{Charge, ChargeBasis};
    let charge = |micros, currency: &str, basis, corrects: Option<&str>| Charge {
        micros,
        currency: currency.into(),
        basis,
        catalog_seq: (basis != ChargeBasis::Event).then_some(0),
        period: "2026-11-01".into(),
        corrects: corrects.map(str::to_string),
    };
    let at = t("2026-11-02T10:00:00Z");
    let tokens_only = event("acme", "e1", at, "llm_call", "a", "gpt-5-mini", "t", None);
    let priced = event("acme", "e2", at, "llm_call", "a", "m", "t", Some((7, "USD")));
    let unknown_model = event("acme", "e3", at, "llm_call", "a", "mystery", "t", None);
    let euros = event("acme", "e4", at, "llm_call", "a", "m", "t", Some((9, "EUR")));
    let late = event("acme", "e5", at, "llm_call", "a", "gpt-5-mini", "t", None);
    // Occurred in October, billed in November's period: in October's usage, November's bill.
    let october = event("acme", "e6", t("2026-10-20T10:00:00Z"), "llm_call", "a", "gpt-5-mini", "t", None);
    let f = Fixture::new();
    f.ingest_charged(
        &[
            (tokens_only, Some(charge(250_000, "USD", ChargeBasis::Table, None))),
            (priced, Some(charge(7, "USD", ChargeBasis::Event, None))),
            (unknown_model, Some(charge(40_000, "USD", ChargeBasis::Ceiling, None))),
            (euros, Some(charge(9, "EUR", ChargeBasis::Event, None))),
            (late, Some(charge(1_000, "USD", ChargeBasis::Table, Some("2026-10-01")))),
            (october, Some(charge(300, "USD", ChargeBasis::Table, Some("2026-10-01")))),
        ],
        &["UTC"],
    );
    let r = f.router();
    let spend = get_json(&r, "/v1/spend?period=2026-11", &f.tokens["billing"]).await;
    let rows = spend["rows"].as_array().unwrap();
    let line = |currency: &str, basis: &str, class: Option<&str>| {
        rows.iter()
            .find(|r| r["BillingCurrency"] == currency && r["x_ChargeBasis"] == basis && r["ChargeClass"].as_str() == class)
            .unwrap_or_else(|| panic!("no {currency} {basis} {class:?} row in {spend}"))
    };
    let table = line("USD", "table", None);
    assert_eq!(
        (table["BilledCost"].as_str(), table["x_ChargedMicros"].as_i64(), table["x_ClaimedCostMicros"].as_i64()),
        (Some("0.250000"), Some(250_000), Some(0))
    );
    assert_eq!((table["PricingQuantity"].as_i64(), table["PricingUnit"].as_str()), (Some(8), Some("Tokens")));
    assert_eq!(line("USD", "event", None)["PricingUnit"].as_str(), Some("Events"));
    assert_eq!(line("USD", "ceiling", None)["ListCost"].as_str(), Some("0.040000"));
    assert_eq!(line("EUR", "event", None)["x_ChargedMicros"].as_i64(), Some(9));
    assert_eq!(line("USD", "table", Some("Correction"))["x_ChargedMicros"].as_i64(), Some(1_000));
    assert_eq!(rows.len(), 5, "{spend}");
    for column in [
        "BillingAccountId",
        "BillingAccountName",
        "BillingCurrency",
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "ChargeCategory",
        "ChargeClass",
        "ChargeDescription",
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "BilledCost",
        "EffectiveCost",
        "ListCost",
        "ContractedCost",
        "PricingQuantity",
        "PricingUnit",
        "InvoiceIssuerName",
        "ProviderName",
        "PublisherName",
        "ServiceCategory",
        "ServiceName",
    ] {
        assert!(table.get(column).is_some(), "FOCUS 1.2 column {column} missing: {table}");
    }
    assert_eq!((table["BillingAccountId"].as_str(), table["ServiceCategory"].as_str()), (Some("acme"), Some("AI and Machine Learning")));
    assert_eq!(table["x_LogOrigin"].as_str(), Some(format!("{}/t/acme", common::ORIGIN).as_str()), "where its rows are proved");

    let costs = get_json(&r, "/v1/tenants/acme/costs?from=2026-11-01&to=2026-11-30", &f.tokens["acme"]).await;
    let usd = costs["totals"].as_array().unwrap().iter().find(|t| t["currency"] == "USD").unwrap().clone();
    assert_eq!((usd["charge_micros"].as_i64(), usd["cost_micros"].as_i64()), (Some(250_000 + 7 + 40_000 + 1_000), Some(7)), "{costs}");

    // The report of the billing period: every charge billed in it, whenever the event occurred.
    let usd_of =
        |costs: &serde_json::Value| costs["totals"].as_array().unwrap().iter().find(|t| t["currency"] == "USD").map(|t| t["charge_micros"].as_i64().unwrap());
    let period = get_json(&r, "/v1/tenants/acme/costs?billing_period=2026-11-01&group_by=day", &f.tokens["acme"]).await;
    assert_eq!((usd_of(&period), period["billing_period"].as_str()), (Some(250_000 + 7 + 40_000 + 1_000 + 300), Some("2026-11-01")), "{period}");
    assert!(period["rows"].as_array().unwrap().iter().any(|r| r["day"] == "2026-10-20"), "the late event's own day: {period}");
    let narrowed = get_json(&r, "/v1/tenants/acme/costs?billing_period=2026-11-01&from=2026-11-01&to=2026-11-30", &f.tokens["acme"]).await;
    assert_eq!(usd_of(&narrowed), Some(250_000 + 7 + 40_000 + 1_000));
    let october = get_json(&r, "/v1/tenants/acme/costs?billing_period=2026-10-01", &f.tokens["acme"]).await;
    assert_eq!(october["totals"].as_array().unwrap().len(), 0, "nothing is billed in the closed period");
    let (status, body) = send(&r, "GET", "/v1/tenants/acme/costs?billing_period=November", Some(&f.tokens["acme"]), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("billing_period"));
    let (status, body) = send(&r, "GET", "/v1/tenants/acme/costs?to=2026-11-30", Some(&f.tokens["acme"]), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("from is required"));
}

/// The billing-period view: each tenant's closed periods that start in the month, one row per
/// statement line, bounded by the tenant's own period and naming the statement's seq; a tenant
/// with no closed period there has no invoice lines.
#[tokio::test]
async fn spend_by_billing_period_comes_from_the_statements() {
    use tally_log::{ChargeBasis, Statement, StatementTotal};
    let f = fixture();
    let total = |currency: &str, basis, correction, events, micros, input_tokens| StatementTotal {
        currency: currency.into(),
        basis,
        correction,
        events,
        micros,
        input_tokens: Some(input_tokens),
        output_tokens: Some(5),
    };
    // acme's periods start on the 15th, in Paris.
    let statement = |period: &str, start: &str, end: &str, totals| Statement {
        at: t("2026-12-20T00:00:00Z"),
        period: period.parse().unwrap(),
        period_start: t(start),
        period_end: t(end),
        time_zone: "Europe/Paris".into(),
        first_seq: 0,
        last_seq: 29,
        tree_size: 0,
        totals,
    };
    f.append_statement(
        "acme",
        &statement("2026-10-15", "2026-10-14T22:00:00Z", "2026-11-14T23:00:00Z", vec![total("USD", ChargeBasis::Event, false, 1, 1, 0)]),
    );
    let seq = f.append_statement(
        "acme",
        &statement(
            "2026-11-15",
            "2026-11-14T23:00:00Z",
            "2026-12-14T23:00:00Z",
            vec![total("USD", ChargeBasis::Table, false, 3, 9_000, 4_000), total("USD", ChargeBasis::Table, true, 1, 500, 10)],
        ),
    );
    let r = f.router();
    let spend = get_json(&r, "/v1/spend?period=2026-11&calendar=billing", &f.tokens["billing"]).await;
    assert_eq!(spend["calendar"], "billing");
    let rows = spend["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "acme's November period only; globex has closed none: {spend}");
    let regular = &rows[0];
    assert_eq!(
        (regular["BillingPeriodStart"].as_str(), regular["BillingPeriodEnd"].as_str(), regular["ChargePeriodStart"].as_str()),
        (Some("2026-11-14T23:00:00Z"), Some("2026-12-14T23:00:00Z"), Some("2026-11-14T23:00:00Z"))
    );
    assert_eq!((regular["x_StatementSeq"].as_u64(), regular["BilledCost"].as_str()), (Some(seq), Some("0.009000")));
    assert_eq!((regular["PricingQuantity"].as_i64(), regular["PricingUnit"].as_str()), (Some(4_005), Some("Tokens")));
    assert!(regular["x_ClaimedCostMicros"].is_null(), "a statement holds the charge, not the claim");
    assert_eq!((rows[1]["ChargeClass"].as_str(), rows[1]["x_ChargedMicros"].as_i64()), (Some("Correction"), Some(500)));

    // The calendar-month view stays as it was, with no statement seq.
    let month = get_json(&r, "/v1/spend?period=2026-11", &f.tokens["billing"]).await;
    assert_eq!(month["calendar"], "month");
    assert!(month["rows"].as_array().unwrap().iter().all(|r| r["x_StatementSeq"].is_null() && r["x_ClaimedCostMicros"].is_i64()));
    let (status, body) = send(&r, "GET", "/v1/spend?period=2026-11&calendar=fiscal", Some(&f.tokens["billing"]), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("calendar"));
}

#[tokio::test]
async fn spend_is_the_same_from_the_daily_and_the_15_minute_roll_ups() {
    let events: Vec<_> = (0..40)
        .map(|i| {
            let at = t("2026-10-31T20:00:00Z") + jiff::SignedDuration::from_mins(61 * i);
            event(
                ["acme", "globex"][i as usize % 2],
                &format!("e{i}"),
                at,
                "llm_call",
                "a",
                "m",
                "t",
                (i % 5 != 0).then_some((1_000 * i, ["USD", "EUR"][i as usize % 3 / 2])),
            )
        })
        .collect();
    let mut answers = Vec::new();
    for zones in [&["UTC"][..], &["Asia/Tokyo"][..]] {
        let f = Fixture::new();
        f.ingest_with_zones(&events, zones);
        let spend = get_json(&f.router(), "/v1/spend?period=2026-11", &f.tokens["billing"]).await;
        answers.push(spend["rows"].clone());
    }
    assert_eq!(answers[0], answers[1]);
    let rows = answers[0].as_array().unwrap();
    let want: i64 = events.iter().filter(|e| e.occurred_at >= t("2026-11-01T00:00:00Z")).filter_map(|e| e.cost.as_ref()).map(|c| c.amount_micros).sum();
    assert_eq!(rows.iter().map(|r| r["x_ChargedMicros"].as_i64().unwrap()).sum::<i64>(), want, "October's events are not November's bill");
}

/// Checks an export the way an outside verifier would (`tally verify export`): the signed
/// checkpoint, the entries against its root with the range proof, and every row against its
/// entry.
fn verify_export(f: &Fixture, export: &serde_json::Value) -> bool {
    let export: tally_query::reports::AuditExport = serde_json::from_value(export.clone()).unwrap();
    tally_query::verify_export(&export, &f.verifiers("acme")).is_ok()
}

#[tokio::test]
async fn an_audit_export_proves_its_range_complete_and_a_deleted_row_is_reported() {
    let f = fixture();
    let r = f.router();
    let token = &f.tokens["regulator"];
    let export = get_json(&r, "/v1/tenants/acme/audit-export?from_seq=5&to_seq=20", token).await;
    assert_eq!(export["complete"], true, "{export}");
    assert_eq!(export["rows"].as_array().unwrap().len(), 16);
    assert_eq!(export["tree_size"].as_u64(), Some(30));
    assert!(verify_export(&f, &export));
    let whole = get_json(&r, "/v1/tenants/acme/audit-export", token).await;
    assert_eq!((whole["complete"].as_bool(), whole["from_seq"].as_u64(), whole["to_seq"].as_u64()), (Some(true), Some(0), Some(29)));

    // Change row 7's cost (its leaf hash left as it was), then delete row 12.
    tamper(&f, |seq, batch, i| {
        if seq != 7 {
            return None;
        }
        let cost = batch.column_by_name("cost_micros").unwrap().as_any().downcast_ref::<datafusion::arrow::array::Int64Array>().unwrap();
        let changed: datafusion::arrow::array::Int64Array = (0..batch.num_rows()).map(|j| Some(if j == i { 1 } else { cost.value(j) })).collect();
        let idx = batch.schema().index_of("cost_micros").unwrap();
        let mut columns = batch.columns().to_vec();
        columns[idx] = Arc::new(changed);
        Some(datafusion::arrow::array::RecordBatch::try_new(batch.schema(), columns).unwrap())
    });
    let export = get_json(&r, "/v1/tenants/acme/audit-export?from_seq=5&to_seq=20", token).await;
    assert_eq!(
        (export["complete"].as_bool(), &export["mismatched_seqs"]),
        (Some(false), &serde_json::json!([7])),
        "an altered row is caught although its leaf hash is intact"
    );
    tamper(&f, |seq, batch, i| {
        (seq == 12).then(|| {
            let mask: datafusion::arrow::array::BooleanArray = (0..batch.num_rows()).map(|j| Some(j != i)).collect();
            datafusion::arrow::compute::filter_record_batch(batch, &mask).unwrap()
        })
    });
    let export = get_json(&r, "/v1/tenants/acme/audit-export?from_seq=5&to_seq=20", token).await;
    assert_eq!(export["complete"], false);
    assert_eq!(export["missing_seqs"], serde_json::json!([12]));
    assert!(!verify_export(&f, &export), "an outside verifier notices the gap too");

    let (status, body) = send(&r, "GET", "/v1/tenants/acme/audit-export?from_seq=5&to_seq=30", Some(token), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
    let (status, _) = send(&r, "GET", "/v1/tenants/globex/audit-export", Some(token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a regulator sees only the tenants its token names");
}

#[tokio::test]
async fn an_export_past_its_byte_limit_is_cut_and_each_part_proves_itself() {
    // 3,000 events of about 1 KB: about 3 MB of entries, against a limit of 1 MiB.
    let f = Fixture::new();
    let pad = "p".repeat(900);
    let events: Vec<_> = (0..3_000)
        .map(|i| {
            let mut e = event("acme", &format!("big-{i}"), t("2026-11-01T10:00:00Z"), "llm_call", "planner", "gpt-x", "task", Some((1, "USD")));
            e.attributes.insert("pad".into(), pad.clone());
            e
        })
        .collect();
    f.ingest(&events);
    let mut config = f.config();
    config.max_export_mb = 1;
    let r = tally_query::router_for_tests(config).unwrap();
    let token = &f.tokens["regulator"];
    let (mut from, mut parts, mut seen) = (0u64, 0, 0u64);
    loop {
        let export = get_json(&r, &format!("/v1/tenants/acme/audit-export?from_seq={from}&to_seq=2999"), token).await;
        assert_eq!(export["complete"], true, "each part is complete for what it serves");
        assert!(verify_export(&f, &export), "each part's proof rebuilds the signed root");
        let (first, last) = (export["from_seq"].as_u64().unwrap(), export["to_seq"].as_u64().unwrap());
        assert_eq!(first, from);
        let bytes: usize = export["entries"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().len() * 3 / 4).sum();
        assert!(bytes <= (1 << 20) + 2_000, "a part holds about max_export_mb of entries, not {bytes}");
        seen += last - first + 1;
        parts += 1;
        match export["next_from_seq"].as_u64() {
            Some(next) => {
                assert_eq!((export["truncated"].as_bool(), next), (Some(true), last + 1));
                from = next;
            }
            None => {
                assert_eq!((export["truncated"].as_bool(), last), (Some(false), 2999));
                break;
            }
        }
    }
    assert_eq!(seen, 3_000);
    assert!(parts >= 3, "3 MB of entries take several parts, not {parts}");
}

/// Rewrites the projection file holding each acme row for which `change(seq, batch, index)`
/// returns a replacement batch.
fn tamper(f: &Fixture, change: impl Fn(u64, &datafusion::arrow::array::RecordBatch, usize) -> Option<datafusion::arrow::array::RecordBatch>) {
    let root = f.data_dir().join("parquet");
    for file in tally_projection::list_files(&root, tally_projection::Tree::Events, common::UNIT, |_| true).unwrap() {
        let mut batches = tally_projection::read_parquet(&file.path).unwrap();
        let mut touched = false;
        for b in batches.iter_mut() {
            let seqs = b.column_by_name("seq").unwrap().as_any().downcast_ref::<datafusion::arrow::array::UInt64Array>().unwrap().clone();
            // Files are shared by the partition's tenants: only acme's rows are changed.
            let tenants = b.column_by_name("tenant_id").unwrap().as_any().downcast_ref::<datafusion::arrow::array::StringArray>().unwrap().clone();
            for i in (0..seqs.len()).filter(|&i| tenants.value(i) == "acme") {
                if let Some(new) = change(seqs.value(i), b, i) {
                    *b = new;
                    touched = true;
                    break;
                }
            }
        }
        if touched {
            let out = std::fs::File::create(&file.path).unwrap();
            let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(out, Arc::clone(batches[0].schema_ref()), None).unwrap();
            batches.iter().for_each(|b| w.write(b).unwrap());
            w.close().unwrap();
        }
    }
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Reaches the handler: anything but 401 and 403.
    Allowed,
    Forbidden,
    Unauthenticated,
    /// 401 `token_expired`.
    Expired,
}

/// Every route of the query service (`{t}` for the tenant) and who may call it
/// (docs/http-api.md, the role matrix).
fn route_matrix() -> [(&'static str, &'static str, Option<serde_json::Value>, [Want; 11]); 8] {
    use Want::{Allowed as A, Expired as E, Forbidden as F, Unauthenticated as U};
    let sql = Some(serde_json::json!({"sql": "SELECT count(*) FROM events"}));
    //                                                                    own other reg+ reg- gw+ gw- bill metr admin exp none
    [
        ("GET", "/healthz", None, /*                                  */ [A, A, A, A, A, A, A, A, A, A, A]),
        ("GET", "/openapi.json", None, /*                             */ [A, A, A, A, A, A, A, A, A, A, A]),
        ("GET", "/metrics", None, /*                                  */ [F, F, F, F, F, F, F, A, A, E, U]),
        ("GET", "/v1/tenants/{t}/events", None, /*                    */ [A, F, A, F, F, F, F, F, A, E, U]),
        ("GET", "/v1/tenants/{t}/costs", None, /*                     */ [A, F, A, F, F, F, A, F, A, E, U]),
        ("POST", "/v1/tenants/{t}/sql", sql, /*                       */ [A, F, A, F, F, F, F, F, A, E, U]),
        ("GET", "/v1/tenants/{t}/audit-export", None, /*              */ [A, F, A, F, F, F, F, F, A, E, U]),
        ("GET", "/v1/spend?period=2026-11", None, /*                  */ [F, F, F, F, F, F, A, F, A, E, U]),
    ]
}

/// Who may do what, route by route: every route of the query service against every kind of caller.
#[tokio::test]
async fn every_route_against_every_role() {
    use Want::{Allowed as A, Expired as E, Forbidden as F, Unauthenticated as U};
    let f = Fixture::new();
    f.ingest(&[
        event("acme", "e1", ts("2026-11-02T10:00:00Z"), "llm_call", "a", "m", "t", Some((100, "USD"))),
        event("globex", "e2", ts("2026-11-02T10:00:00Z"), "llm_call", "a", "m", "t", Some((100, "USD"))),
    ]);
    let r = f.router();
    // (who, token, the tenant in the path). The regulator and the gateway name acme only.
    let callers: [(&str, Option<&str>, &str); 11] = [
        ("tenant, own", Some(&f.tokens["acme"]), "acme"),
        ("tenant, other", Some(&f.tokens["acme"]), "globex"),
        ("regulator, named", Some(&f.tokens["regulator"]), "acme"),
        ("regulator, not named", Some(&f.tokens["regulator"]), "globex"),
        ("gateway, named", Some(&f.tokens["gateway"]), "acme"),
        ("gateway, not named", Some(&f.tokens["gateway"]), "globex"),
        ("billing", Some(&f.tokens["billing"]), "acme"),
        ("metrics", Some(&f.tokens["metrics"]), "acme"),
        ("admin", Some(&f.tokens["admin"]), "acme"),
        ("admin, expired", Some(&f.tokens["expired"]), "acme"),
        ("no token", None, "acme"),
    ];
    let mut wrong = Vec::new();
    for (method, route, body, wants) in route_matrix() {
        for ((who, token, tenant), want) in callers.iter().zip(wants) {
            let path = route.replace("{t}", tenant);
            let (status, bytes) = send(&r, method, &path, *token, body.clone()).await;
            let code = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|j| j["error"]["code"].as_str().map(String::from));
            let got = match (status, code.as_deref()) {
                (StatusCode::FORBIDDEN, _) => F,
                (StatusCode::UNAUTHORIZED, Some("token_expired")) => E,
                (StatusCode::UNAUTHORIZED, _) => U,
                _ => A,
            };
            if got != want {
                wrong.push(format!("{method} {path} as {who}: want {want:?}, got {status} {}", String::from_utf8_lossy(&bytes)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `/metrics` is Prometheus text with per-route latency and errors by code, and never a tenant id.
#[tokio::test]
async fn metrics_count_routes_and_error_codes_without_tenant_ids() {
    let f = Fixture::new();
    f.ingest(&[event("acme", "e1", ts("2026-11-02T10:00:00Z"), "llm_call", "a", "m", "t", Some((100, "USD")))]);
    let r = f.router();
    get_json(&r, "/v1/tenants/acme/events", &f.tokens["acme"]).await;
    let (status, _) = send(&r, "GET", "/v1/tenants/acme/events?colour=red", Some(&f.tokens["acme"]), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = send(&r, "GET", "/metrics", Some(&f.tokens["metrics"]), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    for line in [
        r#"tally_query_http_request_duration_seconds_count{method="GET",route="/v1/tenants/{tenant}/events",status="200"} 1"#,
        r#"tally_query_http_request_duration_seconds_count{method="GET",route="/v1/tenants/{tenant}/events",status="400"} 1"#,
        r#"tally_query_http_errors_total{code="bad_request",route="/v1/tenants/{tenant}/events"} 1"#,
        "tally_query_running 0",
        "tally_query_memory_reserved_bytes 0",
        "tally_query_token_reload_failures_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
    }
    assert!(!text.contains("acme"), "{text}");
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let f = Fixture::new();
    let r = f.router();
    let (status, body) = send(&r, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let mut listed = Vec::new();
    for (method, route, _, _) in route_matrix() {
        let template = route.split('?').next().unwrap().replace("{t}", "{tenant}");
        assert!(paths.get(&template).is_some_and(|p| p[method.to_lowercase()].is_object()), "{method} {template} missing from openapi.json");
        listed.push(template);
    }
    for documented in paths.keys() {
        assert!(listed.contains(documented), "openapi.json documents {documented}, which the router does not serve");
    }
    let (status, body) = send(&r, "GET", "/v1/nothing", Some(&f.tokens["admin"]), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"]["code"], "not_found");
}

/// A SQL body past the service's bound is refused in the API's error shape.
#[tokio::test]
async fn a_body_over_the_limit_is_413_body_too_large() {
    let f = fixture();
    let sql = format!("SELECT seq FROM events WHERE event_id = '{}'", "x".repeat(2 << 20));
    let (status, body) = send(&f.router(), "POST", "/v1/tenants/acme/sql", Some(&f.tokens["acme"]), Some(serde_json::json!({ "sql": sql }))).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large")), "{json}");
}

/// A `max_rows` below the default page size caps the default page instead of refusing a
/// request that names no `limit`.
#[tokio::test]
async fn the_default_page_never_exceeds_max_rows() {
    let f = Fixture::new();
    let events: Vec<_> = (0..12).map(|i| event("acme", &format!("e{i}"), ts("2026-11-02T10:00:00Z"), "llm_call", "a", "m", "t", Some((1, "USD")))).collect();
    f.ingest(&events);
    let mut config = f.config();
    config.max_rows = 5;
    let r = tally_query::router_for_tests(config).unwrap();
    let page = get_json(&r, "/v1/tenants/acme/events", &f.tokens["acme"]).await;
    assert_eq!(page["rows"].as_array().map(Vec::len), Some(5), "{page}");
    let (status, _) = send(&r, "GET", "/v1/tenants/acme/events?limit=6", Some(&f.tokens["acme"]), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an explicit limit past max_rows is still refused");
}
