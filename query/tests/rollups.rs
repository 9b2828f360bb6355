//! Property: every cost roll-up the service answers, and the spend export, equal an independent
//! computation over the same generated events — random tenants, agents, models, tasks, kinds,
//! currencies, costs, recorded charges (`event`, `table`, `ceiling`, none), and instants at and
//! around local midnights in zones with odd offsets and DST — whether the report is answered from
//! the daily roll-ups (zones the ledger keeps them for) or the 15-minute ones.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{event, Fixture};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use tally_log::{Charge, ChargeBasis};
use tally_query::reports::{costs, spend, CostQuery, Dim};
use tally_query::{Engine, QueryConfig};

const ZONES: [&str; 6] = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe"];
const DIMS: [Dim; 5] = [Dim::Day, Dim::Agent, Dim::Action, Dim::Task, Dim::Kind];

/// One generated event: tenant, day, where in the day, agent, model, task, kind, cost, and for an
/// event without cost the charge its tokens were rated (basis 0: none, 1: table, 2: ceiling;
/// micros; USD or EUR).
type Raw = (usize, i64, u8, i64, usize, usize, usize, usize, Option<(i64, bool)>, (u8, i64, bool));

/// A report row's dimension values and currency.
type RowKey = (Vec<Option<String>>, Option<String>);
fn raw_event() -> impl Strategy<Value = Raw> {
    (
        0..3usize,
        0..5i64,
        0..4u8,
        0..86_400i64,
        0..3usize,
        0..3usize,
        0..4usize,
        0..3usize,
        proptest::option::of((0..5_000_000i64, any::<bool>())),
        (0..3u8, 0..5_000_000i64, any::<bool>()),
    )
}

/// The instant an event happens at: exactly at, just before or just after a local midnight,
/// or anywhere in the day. The days run over the 2026 end of DST in Europe and America.
fn instant(tz: &TimeZone, day: i64, edge: u8, secs: i64) -> Timestamp {
    let date = jiff::civil::date(2026, 10, 24) + jiff::Span::new().days(day);
    let midnight = date.to_zoned(tz.clone()).unwrap().timestamp();
    match edge {
        0 => midnight,
        1 => midnight - SignedDuration::from_secs(1),
        2 => midnight + SignedDuration::from_micros(1),
        _ => midnight + SignedDuration::from_secs(secs),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_rollup_equals_the_sum_over_its_events(raws in proptest::collection::vec(raw_event(), 1..120), zone in 0..ZONES.len(), dims_mask in 0u8..32) {
        let tz = TimeZone::get(ZONES[zone]).unwrap();
        let group_by: Vec<Dim> = DIMS.iter().enumerate().filter(|(i, _)| dims_mask & (1 << i) != 0).map(|(_, d)| *d).collect();
        let f = Fixture::new();
        let currency = |usd: bool| if usd { "USD" } else { "EUR" };
        let charged: Vec<(tally_schemas::Event, Option<Charge>)> = raws.iter().enumerate().map(|(i, r)| {
            let (tenant, day, edge, secs, agent, model, task, kind, cost, (basis, micros, usd)) = *r;
            let at = instant(&tz, day, edge, secs);
            let cost = cost.map(|(m, usd)| (m, currency(usd)));
            let e = event(&format!("t{tenant}"), &format!("e{i}"), at, ["llm_call", "tool_call", "handoff"][kind], &format!("agent{agent}"), &format!("model{model}"), &format!("task{task}"), cost);
            let period = at.strftime("%Y-%m-01").to_string();
            let charge = match (cost, basis) {
                (Some((m, c)), _) => Some(Charge { micros: m, currency: c.into(), basis: ChargeBasis::Event, catalog_seq: None, period, corrects: None }),
                (None, 0) => None,
                (None, b) => Some(Charge { micros, currency: currency(usd).into(), basis: if b == 1 { ChargeBasis::Table } else { ChargeBasis::Ceiling }, catalog_seq: Some(0), period, corrects: None }),
            };
            (e, charge)
        }).collect();
        let events: Vec<_> = charged.iter().map(|(e, _)| e.clone()).collect();
        f.ingest_charged(&charged, &common::DAILY_ZONES);
        let config: QueryConfig = f.config();
        let engine = Engine::new(&config);
        // The report covers local days 1..=3 of the five, so events on both sides are excluded.
        let from = (jiff::civil::date(2026, 10, 25)).to_zoned(tz.clone()).unwrap().timestamp();
        let to = (jiff::civil::date(2026, 10, 28)).to_zoned(tz.clone()).unwrap().timestamp();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for tenant in ["t0", "t1", "t2"] {
            let q = CostQuery { from, to, tz: tz.clone(), group_by: group_by.clone(), billing_period: None };
            let report = rt.block_on(costs(&engine, tenant, &q, Duration::from_secs(30))).unwrap();
            // A tenant with no events has no projection, so no daily roll-ups either.
            let projected = events.iter().any(|e| e.tenant_id == tenant);
            let daily = projected && common::DAILY_ZONES.contains(&ZONES[zone]) && !group_by.contains(&Dim::Task);
            prop_assert_eq!(report.source, if daily { "daily" } else { "15-minute" });
            let (rows, totals) = (report.rows, report.totals);
            // Independent: straight over the events, no buckets, no Parquet.
            let mut want: BTreeMap<RowKey, (i64, i64, i64, i64, i64)> = BTreeMap::new();
            for (e, charge) in charged.iter().filter(|(e, _)| e.tenant_id == tenant && e.occurred_at >= from && e.occurred_at < to) {
                let dims = group_by.iter().map(|d| match d {
                    Dim::Day => Some(e.occurred_at.to_zoned(tz.clone()).date().to_string()),
                    Dim::Agent => e.agent_id.clone(),
                    Dim::Action => e.action.clone(),
                    Dim::Task => e.task_id.clone(),
                    Dim::Kind => Some(e.kind.clone()),
                }).collect();
                let currency = charge.as_ref().map(|c| c.currency.clone()).or_else(|| e.cost.as_ref().map(|c| c.currency.clone()));
                let w = want.entry((dims, currency)).or_default();
                w.0 += 1;
                w.1 += e.cost.as_ref().map_or(0, |c| c.amount_micros);
                w.2 += charge.as_ref().map_or(0, |c| c.micros);
                w.3 += 3;
                w.4 += 5;
            }
            let got: BTreeMap<_, _> = rows.iter().map(|r| ((r.dims.clone(), r.currency.clone()), (r.events, r.cost_micros, r.charge_micros, r.input_tokens, r.output_tokens))).collect();
            prop_assert_eq!(&got, &want, "tenant {} zone {} group_by {:?}", tenant, ZONES[zone], group_by);
            let mut want_totals: BTreeMap<Option<String>, (i64, i64)> = BTreeMap::new();
            for ((_, currency), w) in &want {
                let t = want_totals.entry(currency.clone()).or_default();
                t.0 += w.1;
                t.1 += w.2;
            }
            let got_totals: BTreeMap<Option<String>, (i64, i64)> = totals.iter().map(|t| (t.currency.clone(), (t.cost_micros, t.charge_micros))).collect();
            prop_assert_eq!(got_totals, want_totals);
        }
        // The spend export of the UTC month bills the same charges, per tenant and currency.
        for month in ["2026-10", "2026-11"] {
            let spend = rt.block_on(spend(&engine, month, tally_query::reports::SpendCalendar::Month, Duration::from_secs(30))).unwrap();
            let mut got: BTreeMap<(String, String), i64> = BTreeMap::new();
            for s in &spend {
                *got.entry((s.tenant.clone(), s.currency.clone().unwrap_or_default())).or_default() += s.sums.charge_micros;
            }
            got.retain(|_, v| *v != 0);
            let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
            for (e, c) in &charged {
                if let Some(c) = c.as_ref().filter(|_| e.occurred_at.strftime("%Y-%m").to_string() == month) {
                    *want.entry((e.tenant_id.clone(), c.currency.clone())).or_default() += c.micros;
                }
            }
            want.retain(|_, v| *v != 0);
            prop_assert_eq!(got, want, "spend for {}", month);
        }
    }
}
