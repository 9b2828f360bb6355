//! The budget fold end to end, without I/O: decisions, admissions, expiry, replay.

use jiff::Timestamp;
use tally_log::ChargeBasis;
use tally_schemas::Event;

use super::*;

fn budget(extra: &str) -> TenantBudget {
    let text = format!(
        "[plans.p]\nceiling = {{ input_per_million_micros = 10_000_000, output_per_million_micros = 30_000_000 }}\n\
         [plans.p.prices.\"gpt-5-mini\"]\ninput_per_million_micros = 250_000\noutput_per_million_micros = 2_000_000\n\
         [tenants.acme]\nplan = \"p\"\n{extra}"
    );
    let file: BudgetFile = toml::from_str(&text).unwrap();
    file.validate().unwrap();
    file.for_tenant("acme").unwrap()
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn event(id: &str, at: &str, cost: Option<i64>, extra: &str) -> Event {
    let cost = cost.map(|c| format!(r#","cost":{{"amount_micros":{c},"currency":"USD"}}"#)).unwrap_or_default();
    Event::from_json(format!(r#"{{"event_id":"{id}","tenant_id":"acme","occurred_at":"{at}","kind":"llm_call"{cost}{extra}}}"#).as_bytes()).unwrap()
}

/// A log in memory: records as the ledger would append them, decisions right after events.
#[derive(Default)]
struct Log {
    entries: Vec<Vec<u8>>,
    state: BudgetState,
}

impl Log {
    fn seq(&self) -> u64 {
        self.entries.len() as u64
    }

    fn push_budget(&mut self, record: BudgetRecord) {
        self.state.apply_record(&record);
        self.entries.push(record.to_bytes().unwrap());
    }

    fn config(&mut self, b: TenantBudget, at: &str) {
        let seq = self.seq();
        self.push_budget(BudgetRecord::Config { seq, at: ts(at), budget: b });
    }

    fn event(&mut self, e: &Event) -> Vec<BudgetDecision> {
        let source = tally_log::Source::File { file: "test.jsonl".into(), line: self.seq() + 1 };
        let input = tally_log::EventInput { event: e, ce_source: None, payload_sha256: &[0; 32], source: &source };
        let (seq, charge) = (self.seq(), self.state.rate(e));
        self.entries.push(tally_log::event_record(seq, input, charge.as_ref()).unwrap());
        self.state.observe_input(tally_log::input_time(e, &source));
        let decisions = self.state.apply_event(seq, e, charge.as_ref());
        for d in &decisions {
            let seq = self.seq();
            self.push_budget(BudgetRecord::Budget { seq, decision: d.clone() });
        }
        decisions
    }

    fn authorize(&mut self, now: &str, task: Option<&str>, estimate: i64, ttl_ms: i64) -> (Verdict, Option<String>) {
        let now = ts(now);
        let until = now + jiff::SignedDuration::from_millis(ttl_ms);
        let verdict = self.state.authorize(now, until, task, estimate);
        let calendar = self.state.budget().unwrap().calendar().unwrap();
        let seq = self.seq();
        let id = verdict.allowed.then(|| format!("res-{seq}"));
        let admission = Admission {
            allowed: verdict.allowed,
            estimate_micros: estimate,
            reservation_id: id.clone(),
            expires_at: verdict.allowed.then_some(until),
            denied_by: verdict.denied_by,
            day: calendar.day(now),
            period: calendar.period(now),
            more_days: if verdict.allowed { calendar.later_days(now, until) } else { Vec::new() },
            more_periods: if verdict.allowed { calendar.later_periods(now, until) } else { Vec::new() },
            ..bare_admission(&now.to_string(), task)
        };
        self.push_budget(BudgetRecord::Admission { seq, admission });
        (verdict, id)
    }
}

#[test]
fn crossing_the_soft_threshold_then_the_limit_announces_each_once() {
    let mut log = Log::default();
    log.config(budget("day_micros = 1_000\nsoft_threshold = 0.8\n"), "2026-11-02T00:00:00Z");
    assert!(log.event(&event("e1", "2026-11-02T09:00:00Z", Some(700), "")).is_empty());
    let d = log.event(&event("e2", "2026-11-02T09:01:00Z", Some(100), ""));
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].status, d[0].level, d[0].scope.as_str(), d[0].spent_micros), (Status::Warning, Level::Day, "2026-11-02", 800));
    assert!(log.event(&event("e3", "2026-11-02T09:02:00Z", Some(100), "")).is_empty(), "warned once per window");
    let d = log.event(&event("e4", "2026-11-02T09:03:00Z", Some(200), ""));
    assert_eq!((d[0].status, d[0].spent_micros, d[0].limit_micros), (Status::Exceeded, 1_100, 1_000));
    assert!(log.event(&event("e5", "2026-11-02T09:04:00Z", Some(1), "")).is_empty(), "exceeded once per window");
    // The next day is a new window.
    let d = log.event(&event("e6", "2026-11-03T00:00:00Z", Some(900), ""));
    assert_eq!((d[0].status, d[0].scope.as_str()), (Status::Warning, "2026-11-03"), "midnight belongs to the new day");
}

#[test]
fn late_and_out_of_order_events_count_in_their_own_day() {
    let mut log = Log::default();
    log.config(budget("day_micros = 1_000\ntime_zone = \"America/New_York\"\n"), "2026-11-01T00:00:00Z");
    log.event(&event("e1", "2026-11-03T15:00:00Z", Some(600), ""));
    // 03:00 UTC on the 3rd is still the 2nd in New York.
    let d = log.event(&event("late", "2026-11-03T03:00:00Z", Some(1_000), ""));
    assert_eq!((d[0].status, d[0].scope.as_str(), d[0].spent_micros), (Status::Exceeded, "2026-11-02", 1_000));
    let now = ts("2026-11-03T16:00:00Z");
    let day = log.state.levels(now, None).into_iter().find(|l| l.level == Level::Day).unwrap();
    assert_eq!((day.scope.as_str(), day.spent_micros, day.remaining_micros), ("2026-11-03", 600, Some(400)));
}

#[test]
fn fifty_of_a_thousand_dimes_fit_a_five_dollar_period() {
    let mut log = Log::default();
    log.config(budget("period_micros = 5_000_000\n"), "2026-11-01T00:00:00Z");
    let mut allowed = Vec::new();
    for i in 0..1_000 {
        let (v, id) = log.authorize("2026-11-02T10:00:00Z", Some(&format!("task{i}")), 100_000, 60_000);
        if v.allowed {
            allowed.push(id.unwrap());
        } else {
            assert_eq!(v.denied_by, Some(DeniedBy::Period));
        }
    }
    assert_eq!(allowed.len(), 50);
    // Settling at or below the estimate never overshoots.
    for (i, id) in allowed.iter().enumerate() {
        log.event(&event(&format!("e{i}"), "2026-11-02T10:00:01Z", Some(99_000), &format!(r#","reservation_id":"{id}""#)));
    }
    let period = log.state.levels(ts("2026-11-02T10:00:02Z"), None).into_iter().find(|l| l.level == Level::Period).unwrap();
    assert_eq!((period.spent_micros, period.reserved_micros), (4_950_000, 0));
    assert!(period.spent_micros <= 5_000_000);
    // The settled budget frees what the actuals did not use.
    assert!(log.authorize("2026-11-02T10:00:03Z", None, 50_000, 1_000).0.allowed);
}

#[test]
fn expired_reservations_release_their_budget() {
    let mut log = Log::default();
    log.config(budget("day_micros = 1_000\n"), "2026-11-01T00:00:00Z");
    let (v, id) = log.authorize("2026-11-02T10:00:00Z", None, 1_000, 500);
    assert!(v.allowed);
    assert!(!log.authorize("2026-11-02T10:00:00.100Z", None, 1, 500).0.allowed, "held");
    assert!(log.state.expired(ts("2026-11-02T10:00:00.499Z")).is_empty());
    let expired = log.state.expired(ts("2026-11-02T10:00:00.500Z"));
    assert_eq!(expired, vec![id.clone().unwrap()]);
    let seq = log.seq();
    log.push_budget(BudgetRecord::Release {
        seq,
        release: Release { at: ts("2026-11-02T10:00:00.500Z"), reservation_id: id.unwrap(), reason: ReleaseReason::Expired, idempotency: None, token: None },
    });
    assert!(log.authorize("2026-11-02T10:00:01Z", None, 1_000, 500).0.allowed, "no phantom denial");
}

#[test]
fn the_most_specific_level_denies_and_remaining_is_reported() {
    let mut log = Log::default();
    log.config(budget("task_micros = 300\nday_micros = 1_000\nperiod_micros = 10_000\n"), "2026-11-01T00:00:00Z");
    log.event(&event("e1", "2026-11-02T09:00:00Z", Some(250), r#","task_id":"t1""#));
    let (v, _) = log.authorize("2026-11-02T10:00:00Z", Some("t1"), 100, 1_000);
    assert_eq!(v.denied_by, Some(DeniedBy::Task));
    let task = &v.levels[0];
    assert_eq!((task.level, task.remaining_micros), (Level::Task, Some(50)));
    let (v, _) = log.authorize("2026-11-02T10:00:00Z", None, 800, 1_000);
    assert_eq!(v.denied_by, Some(DeniedBy::Day));
}

#[test]
fn windows_restore_when_they_end_and_config_changes_take_effect() {
    let mut log = Log::default();
    log.config(budget("day_micros = 1_000\ntime_zone = \"Europe/Berlin\"\n"), "2026-11-01T00:00:00Z");
    log.event(&event("e1", "2026-11-02T09:00:00Z", Some(1_000), ""));
    assert_eq!(log.state.status(ts("2026-11-02T10:00:00Z"), None), "exceeded");
    assert!(log.state.restorations_due(ts("2026-11-02T22:59:59Z")).is_empty());
    // Berlin's next midnight is 23:00 UTC.
    assert_eq!(log.state.next_window_end(), Some(ts("2026-11-02T23:00:00Z")));
    let due = log.state.restorations_due(ts("2026-11-02T23:00:00Z"));
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].status, due[0].at), (Status::Restored, ts("2026-11-02T23:00:00Z")));
    // A raised limit lifts an exceeded day at once.
    log.event(&event("e2", "2026-11-03T09:00:00Z", Some(1_000), ""));
    log.config(budget("day_micros = 5_000\ntime_zone = \"Europe/Berlin\"\n"), "2026-11-03T10:00:00Z");
    let due = log.state.restorations_due(ts("2026-11-03T10:00:00Z"));
    assert!(due.iter().any(|d| d.scope == "2026-11-03" && d.status == Status::Restored), "{due:?}");
}

#[test]
fn unpriced_calls_use_the_table_or_the_ceiling_never_zero() {
    let b = budget("day_micros = 1_000_000\n");
    let calendar = b.calendar().unwrap();
    let catalog = Some(Catalog { budget: &b, config_seq: 4 });
    let charged = |e: &Event| rate(e, catalog, &calendar, None).map(|c| (c.micros, c.basis, c.catalog_seq, c.currency, c.period));
    let known = event("e1", "2026-11-02T09:00:00Z", None, r#","action":"gpt-5-mini","usage":{"input_tokens":1000000,"output_tokens":1000}"#);
    assert_eq!(charged(&known), Some((250_000 + 2_000, ChargeBasis::Table, Some(4), "USD".into(), "2026-11-01".into())));
    let unknown = event("e2", "2026-11-02T09:00:00Z", None, r#","action":"mystery-9","usage":{"input_tokens":1000,"output_tokens":1000}"#);
    assert_eq!(charged(&unknown), Some((10_000 + 30_000, ChargeBasis::Ceiling, Some(4), "USD".into(), "2026-11-01".into())));
    let priced = event("e3", "2026-11-02T09:00:00Z", Some(7), r#","action":"mystery-9","usage":{"input_tokens":1000,"output_tokens":1000}"#);
    assert_eq!(charged(&priced), Some((7, ChargeBasis::Event, None, "USD".into(), "2026-11-01".into())), "the gateway's own cost comes first");
    // Without a catalog only a cost is charged; nothing at all is charged as nothing.
    assert_eq!(rate(&known, None, &calendar, None), None);
    assert_eq!(rate(&event("e4", "2026-11-02T09:00:00Z", None, ""), catalog, &calendar, None), None);
    // A period a statement closed bills its late events in the first open one, as corrections.
    let late = rate(&known, catalog, &calendar, Some(jiff::civil::date(2026, 11, 1))).unwrap();
    assert_eq!((late.period.as_str(), late.corrects.as_deref(), late.micros), ("2026-12-01", Some("2026-11-01"), 252_000));
    let open = rate(&known, catalog, &calendar, Some(jiff::civil::date(2026, 10, 1))).unwrap();
    assert_eq!((open.period.as_str(), open.corrects), ("2026-11-01", None), "a later period is still open");
    let mut log = Log::default();
    log.config(b, "2026-11-01T00:00:00Z");
    log.event(&unknown);
    assert_eq!(log.state.ceiling_priced, 1);
}

#[test]
fn replaying_a_log_gives_the_same_state_and_decisions() {
    let mut log = Log::default();
    log.config(budget("task_micros = 500\nday_micros = 2_000\nperiod_micros = 5_000\nsoft_threshold = 0.5\n"), "2026-11-01T00:00:00Z");
    for i in 0..40 {
        let at = format!("2026-11-{:02}T{:02}:00:00Z", 2 + i % 5, i % 24);
        log.event(&event(&format!("e{i}"), &at, Some(97 * (i % 7)), &format!(r#","task_id":"t{}""#, i % 3)));
        if i % 9 == 0 {
            log.authorize(&at, Some("t1"), 50, 10_000);
        }
    }
    let mut replay = BudgetState::default();
    let mut i = 0;
    while i < log.entries.len() {
        let decisions = replay.fold(i as u64, &log.entries[i]).unwrap();
        // The decisions an event produces are exactly the budget records that follow it.
        for (k, d) in decisions.iter().enumerate() {
            let stored: BudgetRecord = serde_json::from_slice(&log.entries[i + 1 + k]).unwrap();
            match stored {
                BudgetRecord::Budget { decision, .. } => assert_eq!(&decision, d),
                other => panic!("expected a budget record after entry {i}, found {other:?}"),
            }
        }
        i += 1;
    }
    assert_eq!(replay, log.state);
    assert!(log.entries.iter().any(|e| e.starts_with(br#"{"type":"budget""#)), "the run produced decisions");
}

#[test]
fn budget_records_have_a_stable_shape() {
    let r = BudgetRecord::Budget {
        seq: 9,
        decision: BudgetDecision {
            at: ts("2026-11-02T09:00:00Z"),
            status: Status::Exceeded,
            level: Level::Day,
            scope: "2026-11-02".into(),
            limit_micros: 10,
            spent_micros: 12,
        },
    };
    let text = String::from_utf8(r.to_bytes().unwrap()).unwrap();
    assert_eq!(
        text,
        r#"{"type":"budget","seq":9,"at":"2026-11-02T09:00:00Z","status":"exceeded","level":"day","scope":"2026-11-02","limit_micros":10,"spent_micros":12}"#
    );
    assert_eq!(serde_json::from_str::<BudgetRecord>(&text).unwrap(), r);
}

#[test]
fn huge_amounts_saturate_instead_of_wrapping_past_the_limit() {
    let mut log = Log::default();
    log.config(budget("period_micros = 5_000_000\n"), "2026-11-01T00:00:00Z");
    log.event(&event("e1", "2026-11-02T09:00:00Z", Some(1), ""));
    assert!(!log.authorize("2026-11-02T10:00:00Z", None, i64::MAX, 1_000).0.allowed);
    // Validation caps one event at MAX_AMOUNT_MICROS; the fold must still never wrap (records of
    // older logs, or charges priced from tokens), so these bypass it.
    let huge = |id: &str| {
        let mut e = event(id, "2026-11-02T09:00:00Z", Some(1), "");
        e.cost.as_mut().unwrap().amount_micros = i64::MAX;
        e
    };
    log.event(&huge("e2"));
    log.event(&huge("e3"));
    assert!(!log.authorize("2026-11-02T10:00:00Z", None, 1, 1_000).0.allowed, "spend pinned at the top, not wrapped");
    assert_eq!(log.state.status(ts("2026-11-02T10:00:00Z"), None), "exceeded");
}

#[test]
fn reservations_of_a_tenant_without_limits_still_expire() {
    let mut state = BudgetState::default();
    let admission = Admission {
        estimate_micros: 5,
        reservation_id: Some("res-0".into()),
        expires_at: Some(ts("2026-11-02T10:00:01Z")),
        ..bare_admission("2026-11-02T10:00:00Z", None)
    };
    state.apply_record(&BudgetRecord::Admission { seq: 0, admission });
    assert_eq!(state.next_expiry(), Some(ts("2026-11-02T10:00:01Z")));
}

/// Task totals live within a billing period: the first event of a new period forgets the tasks
/// of ended periods (and their announcements), unless a reservation still holds them; a replay
/// of the same records forgets exactly the same ones.
#[test]
fn tasks_of_ended_periods_are_forgotten_when_a_new_period_opens() {
    let mut log = Log::default();
    log.config(budget("task_micros = 1_000\nperiod_micros = 1_000_000\nsoft_threshold = 0.5\n"), "2026-10-01T00:00:00Z");
    for i in 0..200 {
        log.event(&event(&format!("o{i}"), "2026-10-20T10:00:00Z", Some(10), &format!(r#","task_id":"old{i}""#)));
    }
    let d = log.event(&event("x", "2026-10-21T10:00:00Z", Some(1_000), r#","task_id":"busy""#));
    assert!(d.iter().any(|d| d.level == Level::Task && d.status == Status::Exceeded));
    // A reservation on a task keeps it across the boundary.
    let (verdict, _) = log.authorize("2026-10-31T23:00:00Z", Some("held"), 100, 48 * 3600 * 1000);
    assert!(verdict.allowed);
    log.event(&event("h", "2026-10-31T23:10:00Z", Some(100), r#","task_id":"held""#));
    // Seen through the snapshot a commit would store.
    let tasks = |state: &BudgetState| -> Vec<String> {
        let json = serde_json::to_value(state).unwrap();
        json["spent_task"].as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(tasks(&log.state).len(), 202);
    // November opens: every October task without a reservation is forgotten.
    log.event(&event("n1", "2026-11-01T00:05:00Z", Some(10), r#","task_id":"new""#));
    assert_eq!(tasks(&log.state), ["held", "new"]);
    let announced = serde_json::to_value(&log.state).unwrap()["announced"].to_string();
    assert!(!announced.contains("busy"), "its announcements go with it: {announced}");
    // A forgotten task id used again starts from 0.
    let task = log.state.levels(ts("2026-11-02T00:00:00Z"), Some("busy")).into_iter().find(|l| l.level == Level::Task).unwrap();
    assert_eq!(task.spent_micros, 0);
    // The fold of the same records forgets the same tasks.
    let mut replay = BudgetState::default();
    for (i, entry) in log.entries.iter().enumerate() {
        replay.fold(i as u64, entry).unwrap();
    }
    assert_eq!(replay, log.state);
}

fn keyed_admission(at: &str, key: &str, estimate: i64) -> Admission {
    Admission {
        estimate_micros: estimate,
        reservation_id: Some(format!("res-{key}")),
        expires_at: Some(ts(at) + jiff::SignedDuration::from_secs(60)),
        idempotency: Some(Idempotency::for_authorize(key, &ask(None, estimate, 60_000))),
        token: Some("edge".into()),
        ..bare_admission(at, None)
    }
}

/// A keyed request is remembered with its first answer (without its key and token), and a
/// request hash tells a retry from a reuse of the key for something else.
#[test]
fn keyed_requests_are_remembered_with_their_first_answer() {
    let mut state = BudgetState::default();
    state.apply_record(&BudgetRecord::Admission { seq: 7, admission: keyed_admission("2026-11-02T10:00:00Z", "k1", 5) });
    let first = state.remembered("k1").unwrap();
    assert_eq!((first.seq, first.admission.as_ref().unwrap().reservation_id.as_deref()), (7, Some("res-k1")));
    assert_eq!(first.admission.as_ref().unwrap().token, None);
    assert_eq!(first.request_sha256, Idempotency::for_authorize("k1", &ask(None, 5, 60_000)).request_sha256);
    for other in [
        Idempotency::for_authorize("k1", &ask(None, 6, 60_000)),
        Idempotency::for_authorize("k1", &ask(Some("t"), 5, 60_000)),
        Idempotency::for_authorize("k1", &ask(None, 5, 60_001)),
        Idempotency::for_release("k1", "res-k1"),
    ] {
        assert_ne!(other.request_sha256, first.request_sha256);
    }
    // Length-prefixed parts: moving a character from one part to the next changes the hash.
    assert_ne!(Idempotency::hashed_for_test("k", &["ab", "c"]), Idempotency::hashed_for_test("k", &["a", "bc"]));
    // A release with a key is remembered without an admission.
    let release = Release {
        at: ts("2026-11-02T10:00:01Z"),
        reservation_id: "res-k1".into(),
        reason: ReleaseReason::Released,
        idempotency: Some(Idempotency::for_release("k2", "res-k1")),
        token: Some("edge".into()),
    };
    state.apply_record(&BudgetRecord::Release { seq: 8, release });
    assert_eq!(state.remembered("k2").map(|r| (r.seq, r.admission.is_none())), Some((8, true)));
    // The snapshot keeps them.
    let json = serde_json::to_vec(&state).unwrap();
    let back: BudgetState = serde_json::from_slice(&json).unwrap();
    assert_eq!(back.remembered("k1"), state.remembered("k1"));
}

/// Keys are forgotten after 24 h of record time, and beyond the newest 10,000, the same way on
/// every replay (record times, never the clock).
#[test]
fn remembered_keys_are_bounded_by_age_and_count() {
    let mut state = BudgetState::default();
    state.apply_record(&BudgetRecord::Admission { seq: 0, admission: keyed_admission("2026-11-02T10:00:00Z", "old", 1) });
    state.apply_record(&BudgetRecord::Admission { seq: 1, admission: keyed_admission("2026-11-03T09:59:59Z", "young", 1) });
    assert!(state.remembered("old").is_some(), "23:59:59 later it is still remembered");
    state.apply_record(&BudgetRecord::Admission { seq: 2, admission: keyed_admission("2026-11-03T10:00:01Z", "newer", 1) });
    assert!(state.remembered("old").is_none(), "24 h after its use it is forgotten");
    assert!(state.remembered("young").is_some());
    let mut state = BudgetState::default();
    for i in 0..(MAX_REMEMBERED_KEYS as u64 + 5) {
        state.apply_record(&BudgetRecord::Admission { seq: i, admission: keyed_admission("2026-11-02T10:00:00Z", &format!("k{i}"), 1) });
    }
    assert!(state.remembered("k0").is_none() && state.remembered("k4").is_none());
    assert!(state.remembered("k5").is_some() && state.remembered(&format!("k{}", MAX_REMEMBERED_KEYS + 4)).is_some());
}

/// The issue's case: 23:59:59 and 00:00:01 reservations can no longer both land in one day.
/// The first holds its estimate in both days its minute touches, so the second is denied.
#[test]
fn a_reservation_across_midnight_holds_both_days() {
    let mut log = Log::default();
    log.config(budget("day_micros = 10"), "2026-11-02T00:00:00Z");
    let (first, id) = log.authorize("2026-11-02T23:59:59Z", None, 6, 60_000);
    assert!(first.allowed);
    let (second, _) = log.authorize("2026-11-03T00:00:01Z", None, 6, 60_000);
    assert_eq!((second.allowed, second.denied_by), (false, Some(DeniedBy::Day)), "6 of 10 are held in 2026-11-03 already");
    let admission = String::from_utf8(log.entries.last().unwrap().clone()).unwrap();
    assert!(!admission.contains("more_days"), "a denial holds nothing: {admission}");
    let first_record = String::from_utf8(log.entries[1].clone()).unwrap();
    assert!(first_record.contains(r#""more_days":["2026-11-03"]"#), "{first_record}");
    // Settled by its event in the new day: the old day's hold goes, the spend lands once.
    log.event(&event("e1", "2026-11-03T00:00:30Z", Some(6), &format!(r#","reservation_id":"{}""#, id.unwrap())));
    let (third, _) = log.authorize("2026-11-03T00:01:00Z", None, 4, 60_000);
    assert!(third.allowed, "6 spent + 4 = 10 fits exactly");
    let (fourth, _) = log.authorize("2026-11-02T23:59:59.5Z", None, 10, 100);
    assert!(fourth.allowed, "2026-11-02 has nothing held any more, and 100 ms do not reach midnight");
}

/// The later window is checked, not only held in: spend already in the next day (an event
/// stamped ahead of this clock, or a skewed clock) denies a span reaching into it.
#[test]
fn spend_already_in_the_next_day_denies_a_span_reaching_into_it() {
    let mut log = Log::default();
    log.config(budget("day_micros = 10"), "2026-11-02T00:00:00Z");
    log.event(&event("ahead", "2026-11-03T00:00:30Z", Some(8), ""));
    let (reaching, _) = log.authorize("2026-11-02T23:59:59Z", None, 5, 60_000);
    assert_eq!((reaching.allowed, reaching.denied_by), (false, Some(DeniedBy::Day)), "8 spent in 2026-11-03 + 5 > 10");
    let (short, _) = log.authorize("2026-11-02T23:59:59Z", None, 5, 100);
    assert!(short.allowed, "a span ending before midnight only needs room today");
}

/// No sequence of admissions and settlements around midnight and a period boundary lets
/// settled spend exceed a day or a period limit, whatever each event's time within its
/// reservation's span (a seeded search over many sequences).
#[test]
fn no_sequence_of_admissions_around_window_edges_overshoots() {
    let (day_limit, period_limit) = (1_000_i64, 2_500_i64);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let start = ts("2026-11-30T23:57:00Z");
    for _ in 0..200 {
        let mut log = Log::default();
        log.config(budget(&format!("day_micros = {day_limit}\nperiod_micros = {period_limit}")), "2026-11-01T00:00:00Z");
        let mut now = start;
        let mut held: Vec<(String, Timestamp, Timestamp, i64)> = Vec::new();
        let mut settled = 0;
        for _ in 0..60 {
            now += jiff::SignedDuration::from_millis(next(8_000) as i64);
            let (estimate, ttl_ms) = (1 + next(400) as i64, 1 + next(180_000) as i64);
            if let (v, Some(id)) = log.authorize(&now.to_string(), None, estimate, ttl_ms) {
                assert!(v.allowed);
                held.push((id, now, now + jiff::SignedDuration::from_millis(ttl_ms), estimate));
            }
            // Settle a random held reservation with an event anywhere in its span, at most its estimate.
            if !held.is_empty() && next(2) == 0 {
                let (id, at, until, estimate) = held.swap_remove(next(held.len() as u64) as usize);
                let span = until.duration_since(at).as_millis() as i64;
                let when = at + jiff::SignedDuration::from_millis(next(span.max(1) as u64) as i64);
                settled += 1;
                log.event(&event(&format!("s{settled}"), &when.to_string(), Some(1 + next(estimate as u64) as i64), &format!(r#","reservation_id":"{id}""#)));
            }
        }
        // Every remaining reservation settles too, each at the worst instant: its span's end.
        for (id, _, until, estimate) in held {
            settled += 1;
            log.event(&event(&format!("s{settled}"), &until.to_string(), Some(estimate), &format!(r#","reservation_id":"{id}""#)));
        }
        for day in ["2026-11-30", "2026-12-01"] {
            let spent = log.state.spent(Level::Day, day);
            assert!(spent <= day_limit, "day {day}: {spent} > {day_limit}");
        }
        for period in ["2026-11-01", "2026-12-01"] {
            let spent = log.state.spent(Level::Period, period);
            assert!(spent <= period_limit, "period {period}: {spent} > {period_limit}");
        }
    }
}

fn ask(task_id: Option<&str>, estimate_micros: i64, ttl_ms: i64) -> AuthorizeRequest {
    AuthorizeRequest { task_id: task_id.map(str::to_string), estimate_micros, ttl_ms, ..AuthorizeRequest::default() }
}

impl Log {
    /// The state a restart rebuilds: every entry folded again from the start.
    /// Appends the statements due at `now` (as the ledger's tick does); returns their seqs.
    fn close(&mut self, now: &str, grace_hours: i64) -> Vec<u64> {
        let due = self.state.statements_due(ts(now), jiff::SignedDuration::from_hours(grace_hours));
        due.into_iter()
            .map(|statement| {
                let seq = self.seq();
                self.push_budget(BudgetRecord::Statement { seq, statement: Statement { tree_size: seq, ..statement } });
                seq
            })
            .collect()
    }

    fn replayed(&self) -> BudgetState {
        let mut replay = BudgetState::default();
        for (i, entry) in self.entries.iter().enumerate() {
            replay.fold(i as u64, entry).unwrap();
        }
        replay
    }

    fn period(&self, at: &str) -> LevelState {
        self.state.levels(ts(at), None).into_iter().find(|l| l.level == Level::Period).unwrap()
    }
}

/// Settlement at the edges: an event naming a reservation settles it exactly once, and is
/// charged as any other event in every case: after the reservation expired, a second time,
/// naming an unknown or another tenant's reservation. A replay (a restart) gives the same state.
#[test]
fn settlement_is_exactly_once_and_well_defined_at_the_edges() {
    let mut log = Log::default();
    log.config(budget("period_micros = 10_000"), "2026-11-02T00:00:00Z");
    let settles = |id: &str| format!(r#","reservation_id":"{id}""#);
    let (_, short) = log.authorize("2026-11-02T10:00:00Z", None, 1_000, 1_000);
    let (_, long) = log.authorize("2026-11-02T10:00:00Z", None, 2_000, 3_600_000);
    let (short, long) = (short.unwrap(), long.unwrap());
    assert_eq!(log.period("2026-11-02T10:00:00Z").reserved_micros, 3_000);

    // The short one expires (the ledger appends a `release`, reason `expired`), then its event
    // arrives: nothing is left to settle, so the event is simply charged.
    let expired = log.state.expired(ts("2026-11-02T10:00:02Z"));
    assert_eq!(expired, vec![short.clone()]);
    let seq = log.seq();
    let release = Release { at: ts("2026-11-02T10:00:02Z"), reservation_id: short.clone(), reason: ReleaseReason::Expired, idempotency: None, token: None };
    log.push_budget(BudgetRecord::Release { seq, release });
    log.event(&event("late", "2026-11-02T10:00:00.500Z", Some(900), &settles(&short)));
    let p = log.period("2026-11-02T10:00:03Z");
    assert_eq!((p.spent_micros, p.reserved_micros), (900, 2_000), "charged once, the expired hold not released twice");

    // The long one is settled by its event: the hold goes, the real charge is spend.
    log.event(&event("call", "2026-11-02T10:05:00Z", Some(1_500), &settles(&long)));
    let p = log.period("2026-11-02T10:05:00Z");
    assert_eq!((p.spent_micros, p.reserved_micros), (2_400, 0));
    assert!(!log.state.has_reservation(&long));
    // A second event naming it settles nothing more: charged, reserved stays 0 (never negative).
    log.event(&event("again", "2026-11-02T10:06:00Z", Some(100), &settles(&long)));
    // Unknown, and another tenant's id (reservation ids are per tenant: this tenant holds none
    // by that name), are charged and change nothing else.
    log.event(&event("unknown", "2026-11-02T10:07:00Z", Some(100), &settles("res-999")));
    let p = log.period("2026-11-02T10:07:00Z");
    assert_eq!((p.spent_micros, p.reserved_micros), (2_600, 0));

    // A restart rebuilds exactly this from the log.
    assert_eq!(log.replayed(), log.state);
}

fn tokens_event(id: &str, at: &str, task: &str, tokens: u64, reservation: Option<&str>) -> Event {
    let settles = reservation.map(|r| format!(r#","reservation_id":"{r}""#)).unwrap_or_default();
    event(id, at, Some(1), &format!(r#","task_id":"{task}","usage":{{"input_tokens":{tokens},"output_tokens":0}}{settles}"#))
}

fn units_verdict(log: &mut Log, at: &str, task: &str, tokens: u64) -> (bool, Option<(Level, Unit)>, Option<String>) {
    let (now, until) = (ts(at), ts(at) + jiff::SignedDuration::from_secs(60));
    let denied = log.state.units_deny(now, until, Some(task), tokens);
    if denied.is_some() {
        return (false, denied, None);
    }
    let seq = log.seq();
    let calendar = log.state.calendar().unwrap();
    let admission = Admission {
        estimated_tokens: Some(tokens),
        reservation_id: Some(format!("res-{seq}")),
        expires_at: Some(until),
        more_days: calendar.later_days(now, until),
        more_periods: calendar.later_periods(now, until),
        ..bare_admission(at, Some(task))
    };
    log.push_budget(BudgetRecord::Admission { seq, admission });
    (true, None, Some(format!("res-{seq}")))
}

/// An allowed admission at `at` (UTC, period from the 1st) with nothing else set.
fn bare_admission(at: &str, task: Option<&str>) -> Admission {
    let at = ts(at);
    Admission {
        at,
        allowed: true,
        task_id: task.map(str::to_string),
        estimate_micros: 0,
        reservation_id: None,
        expires_at: None,
        denied_by: None,
        denied_unit: None,
        day: at.to_zoned(jiff::tz::TimeZone::UTC).date(),
        period: "2026-11-01".parse().unwrap(),
        more_days: Vec::new(),
        more_periods: Vec::new(),
        agent_id: None,
        action: None,
        kind: None,
        estimated_tokens: None,
        throttled_by: None,
        retry_after_ms: None,
        freeze_id: None,
        idempotency: None,
        token: None,
    }
}

/// Limits in tokens and calls hold like money's: admissions hold their estimated tokens and
/// one call at every level, events spend their real tokens and one call, settlement swaps the
/// hold for the spend, and a replay counts the same.
#[test]
fn token_and_call_limits_hold_and_spend_like_money() {
    let mut log = Log::default();
    log.config(budget("day_tokens = 1_000\ntask_calls = 2"), "2026-11-02T00:00:00Z");
    let (ok, _, first) = units_verdict(&mut log, "2026-11-02T10:00:00Z", "t1", 600);
    assert!(ok);
    let (ok, denied, _) = units_verdict(&mut log, "2026-11-02T10:00:01Z", "t2", 600);
    assert_eq!((ok, denied), (false, Some((Level::Day, Unit::Tokens))), "600 held + 600 > 1,000");
    // The first call happens and uses only 300 tokens: the hold becomes spend.
    log.event(&tokens_event("e1", "2026-11-02T10:00:02Z", "t1", 300, first.as_deref()));
    let day = log.state.levels(ts("2026-11-02T10:00:03Z"), None).into_iter().find(|l| l.level == Level::Day).unwrap();
    assert_eq!(day.tokens, Some(UnitState { limit: 1_000, spent: 300, reserved: 0, remaining: 700 }));
    assert!(day.calls.is_none(), "no day call limit: not shown");
    assert!(units_verdict(&mut log, "2026-11-02T10:00:04Z", "t2", 600).0, "300 spent + 600 fits");
    // Two calls per task: t1 has spent one and holds none; one more fits, then none.
    assert!(units_verdict(&mut log, "2026-11-02T10:00:05Z", "t1", 0).0);
    let (ok, denied, _) = units_verdict(&mut log, "2026-11-02T10:00:06Z", "t1", 0);
    assert_eq!((ok, denied), (false, Some((Level::Task, Unit::Calls))));
    let task = log.state.levels(ts("2026-11-02T10:00:06Z"), Some("t1")).into_iter().find(|l| l.level == Level::Task).unwrap();
    assert_eq!(task.calls, Some(UnitState { limit: 2, spent: 1, reserved: 1, remaining: 0 }));
    // A new day starts empty for the day's tokens.
    assert!(units_verdict(&mut log, "2026-11-03T00:00:01Z", "t3", 1_000).0);
    assert_eq!(log.replayed(), log.state);
}

/// Currencies never mix: a cost in another currency than the budget's is never added to its
/// limits, whatever its amount; it is counted instead.
#[test]
fn a_cost_in_another_currency_is_never_charged_against_a_limit() {
    let mut log = Log::default();
    log.config(budget("day_micros = 10"), "2026-11-02T00:00:00Z");
    let eur = Event::from_json(
        br#"{"event_id":"eur","tenant_id":"acme","occurred_at":"2026-11-02T10:00:00Z","kind":"llm_call","cost":{"amount_micros":100,"currency":"EUR"}}"#,
    )
    .unwrap();
    let rated = log.state.rate(&eur).unwrap();
    assert_eq!((rated.micros, rated.currency.as_str(), rated.basis), (100, "EUR", ChargeBasis::Event), "charged in its own currency");
    assert!(log.event(&eur).is_empty(), "no decision: nothing was charged");
    log.event(&event("usd", "2026-11-02T10:00:01Z", Some(5), ""));
    let day = log.state.levels(ts("2026-11-02T10:00:02Z"), None).into_iter().find(|l| l.level == Level::Day).unwrap();
    assert_eq!((day.spent_micros, log.state.foreign_currency_events), (5, 1));
    assert_eq!(log.replayed(), log.state);
}

/// A key kept past 24 h behind a younger one (record times out of order: a clock stepped back)
/// is a new request when it comes again: its new answer replaces the stale one.
#[test]
fn a_stale_key_kept_behind_a_younger_one_is_replaced() {
    let mut state = BudgetState::default();
    state.apply_record(&BudgetRecord::Admission { seq: 0, admission: keyed_admission("2026-11-03T12:00:00Z", "a", 1) });
    state.apply_record(&BudgetRecord::Admission { seq: 1, admission: keyed_admission("2026-11-02T10:00:00Z", "b", 1) });
    state.apply_record(&BudgetRecord::Admission { seq: 2, admission: keyed_admission("2026-11-03T11:00:00Z", "b", 1) });
    assert_eq!(state.remembered("b").map(|r| r.seq), Some(2));
    assert_eq!(state.remembered("a").map(|r| r.seq), Some(0));
    assert_eq!(snapshot_round_trip(&state), state);
}

fn snapshot_round_trip(state: &BudgetState) -> BudgetState {
    serde_json::from_slice(&serde_json::to_vec(state).unwrap()).unwrap()
}

/// Snapshots say which fold rules made them; one without (or with an older version) is not
/// loaded, so a changed rule never mixes with state folded under the old one.
#[test]
fn snapshots_carry_the_fold_version() {
    let state = BudgetState::default();
    let mut json = serde_json::to_value(&state).unwrap();
    assert_eq!(json["fold_version"], FOLD_VERSION);
    assert!(serde_json::from_value::<BudgetState>(json.clone()).unwrap().is_current_fold());
    json.as_object_mut().unwrap().remove("fold_version");
    assert!(!serde_json::from_value::<BudgetState>(json).unwrap().is_current_fold(), "a snapshot from before versions is refolded");
}

fn tokens(id: &str, at: &str, model: &str, input: u64, output: u64) -> Event {
    event(id, at, None, &format!(r#","action":"{model}","usage":{{"input_tokens":{input},"output_tokens":{output}}}"#))
}

fn statement_at(log: &Log, seq: u64) -> Statement {
    match tally_log::Record::<BudgetRecord>::decode(seq, &log.entries[seq as usize]).unwrap() {
        tally_log::Record::Budget(BudgetRecord::Statement { statement, .. }) => statement,
        other => panic!("not a statement: {other:?}"),
    }
}

/// Anchor day 31 in New York (DST ends on 1 November 2026): the period from 31 October runs
/// from 04:00 UTC (EDT midnight) to 30 November 05:00 UTC (EST midnight). It closes after its
/// end plus the grace, with its totals; a late event is billed in the open period as a
/// correction; the statement recomputes from the entries, and fails on changed ones.
#[test]
fn a_period_closes_in_the_tenants_calendar_and_late_events_correct_it() {
    let mut log = Log::default();
    log.config(budget("period_anchor_day = 31\ntime_zone = \"America/New_York\"\n"), "2026-10-30T00:00:00Z");
    log.event(&tokens("a", "2026-10-31T04:00:00Z", "gpt-5-mini", 1_000_000, 0)); // 250,000 by the table
    log.event(&tokens("b", "2026-11-30T04:59:59Z", "mystery", 1_000, 0)); // 10,000 at the ceiling; 23:59:59 EST on the 29th
    log.event(&event("c", "2026-11-15T12:00:00Z", Some(7), "")); // the gateway's own cost
    log.event(&tokens("d", "2026-11-30T05:00:00Z", "gpt-5-mini", 4_000_000, 0)); // EST midnight: the next period

    assert!(log.close("2026-11-30T05:59:59Z", 1).is_empty(), "not before the end plus the grace");
    let seqs = log.close("2026-11-30T06:00:00Z", 1);
    assert_eq!(seqs.len(), 1);
    let statement = statement_at(&log, seqs[0]);
    assert_eq!(statement.period.to_string(), "2026-10-31");
    assert_eq!((statement.period_start, statement.period_end), (ts("2026-10-31T04:00:00Z"), ts("2026-11-30T05:00:00Z")));
    assert_eq!((statement.first_seq, statement.last_seq, statement.tree_size, statement.at), (1, 3, seqs[0], ts("2026-11-30T06:00:00Z")));
    let line = |basis, micros, input_tokens| StatementTotal {
        currency: "USD".into(),
        basis,
        correction: false,
        events: 1,
        micros,
        input_tokens: Some(input_tokens),
        output_tokens: Some(0),
    };
    assert_eq!(statement.totals, vec![line(ChargeBasis::Event, 7, 0), line(ChargeBasis::Table, 250_000, 1_000_000), line(ChargeBasis::Ceiling, 10_000, 1_000)]);
    assert!(log.close("2026-12-30T00:00:00Z", 1).is_empty(), "the next period has not ended");

    // A late event of the closed period: billed in the open one, marked as its correction.
    let late = tokens("late", "2026-11-20T12:00:00Z", "gpt-5-mini", 0, 1_000_000);
    let charge = log.state.rate(&late).unwrap();
    assert_eq!((charge.period.as_str(), charge.corrects.as_deref(), charge.micros), ("2026-11-30", Some("2026-10-31"), 2_000_000));
    log.event(&late);
    assert_eq!(log.period("2026-12-01T00:00:00Z").spent_micros, 1_000_000 + 2_000_000, "the correction counts in the open period");
    recompute(&statement, seqs[0], &log.entries).unwrap();
    assert_eq!(log.replayed(), log.state);

    // The next close carries the correction as its own line.
    let next = log.close("2026-12-31T06:00:00Z", 1);
    let december = statement_at(&log, next[0]);
    assert_eq!(
        december.totals.iter().map(|t| (t.basis, t.correction, t.micros)).collect::<Vec<_>>(),
        [(ChargeBasis::Table, false, 1_000_000), (ChargeBasis::Table, true, 2_000_000)]
    );
    recompute(&december, next[0], &log.entries).unwrap();

    // Entries that do not add up: a changed charge, a dropped event, a statement moved earlier.
    let mut changed = log.entries.clone();
    changed[1] = String::from_utf8(changed[1].clone()).unwrap().replace("\"micros\":250000", "\"micros\":250001").into_bytes();
    assert!(matches!(recompute(&statement, seqs[0], &changed), Err(Mismatch::Totals { .. })));
    let mut dropped = log.entries.clone();
    dropped[3] = String::from_utf8(dropped[3].clone()).unwrap().replace("\"period\":\"2026-10-31\"", "\"period\":\"2026-11-30\"").into_bytes();
    assert!(recompute(&statement, seqs[0], &dropped).is_err());
    assert!(matches!(recompute(&statement, 2, &log.entries), Err(Mismatch::AfterClose { .. })));
    let mut more_tokens = log.entries.clone();
    more_tokens[1] = String::from_utf8(more_tokens[1].clone()).unwrap().replace("\"input_tokens\":1000000", "\"input_tokens\":1000001").into_bytes();
    assert!(matches!(recompute(&statement, seqs[0], &more_tokens), Err(Mismatch::Totals { .. })), "the tokens are checked too");
    // A statement from before lines carried tokens verifies on its micros and events.
    let mut legacy = statement.clone();
    legacy.totals.iter_mut().for_each(|t| (t.input_tokens, t.output_tokens) = (None, None));
    recompute(&legacy, seqs[0], &more_tokens).unwrap();
    assert!(matches!(recompute(&legacy, seqs[0], &changed), Err(Mismatch::Totals { .. })));
}

mod rated_once {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// (model, cost (amount, currency), tokens (input, output), agent, seconds into November)
    type RawEvent = (u8, Option<(i64, u8)>, Option<(u64, u64)>, u8, u32);

    fn arb_event() -> impl Strategy<Value = RawEvent> {
        (0u8..3, proptest::option::of((0i64..5_000_000, 0u8..2)), proptest::option::of((0u64..2_000_000, 0u64..500_000)), 0u8..2, 0u32..2_592_000)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the events, prices and currencies: the charge in each record is what the
        /// budget counts (in its own currency only), what the open period's statement lines sum,
        /// and what both roll-up trees sum per currency.
        #[test]
        fn the_recorded_charge_is_what_every_reader_sums(
            events in proptest::collection::vec(arb_event(), 1..40),
            price in (1i64..50_000_000, 1i64..50_000_000),
            currency in 0u8..2,
        ) {
            let currencies = ["USD", "EUR"];
            let extra = format!(
                "period_micros = 1_000_000_000_000\ncurrency = \"{}\"\n[tenants.acme.prices.\"m0\"]\ninput_per_million_micros = {}\noutput_per_million_micros = {}\n",
                currencies[currency as usize], price.0, price.1
            );
            let mut log = Log::default();
            log.config(budget(&extra), "2026-10-31T00:00:00Z");
            let (mut rollup, mut daily) = (tally_projection::Rollup::new(), BTreeMap::new());
            let zones = [("UTC".to_string(), jiff::tz::TimeZone::UTC)];
            let mut by_currency: BTreeMap<String, i64> = BTreeMap::new();
            for (i, (model, cost, usage, agent, secs)) in events.into_iter().enumerate() {
                let at = ts("2026-11-01T00:00:00Z") + jiff::SignedDuration::from_secs(i64::from(secs));
                let cost = cost.map(|(m, c)| format!(r#","cost":{{"amount_micros":{m},"currency":"{}"}}"#, currencies[c as usize])).unwrap_or_default();
                let usage = usage.map(|(i, o)| format!(r#","usage":{{"input_tokens":{i},"output_tokens":{o}}}"#)).unwrap_or_default();
                let json = format!(r#"{{"event_id":"e{i}","tenant_id":"acme","occurred_at":"{at}","kind":"llm_call","agent_id":"a{agent}","action":"m{model}"{cost}{usage}}}"#);
                let e = Event::from_json(json.as_bytes()).unwrap();
                let charge = log.state.rate(&e);
                log.event(&e);
                let tally_log::Record::Event(r) = tally_log::Record::<serde::de::IgnoredAny>::decode(log.seq() - 1, log.entries.last().unwrap()).unwrap() else { panic!() };
                prop_assert_eq!(&r.charge, &charge, "the record holds the charge");
                tally_projection::add_event(&mut rollup, &e, charge.as_ref()).unwrap();
                tally_projection::add_event_daily(&mut daily, &zones, &e, charge.as_ref()).unwrap();
                if let Some(c) = charge {
                    *by_currency.entry(c.currency).or_default() += c.micros;
                }
            }
            let budget_currency = currencies[currency as usize];
            let period = log.period("2026-11-15T00:00:00Z");
            prop_assert_eq!(period.spent_micros, by_currency.get(budget_currency).copied().unwrap_or(0), "the budget counts its own currency only");
            let statement = log.state.statements_due(ts("2027-01-01T00:00:00Z"), jiff::SignedDuration::ZERO);
            let mut lines: BTreeMap<String, i64> = BTreeMap::new();
            for t in statement.iter().flat_map(|s| &s.totals) {
                *lines.entry(t.currency.clone()).or_default() += t.micros;
            }
            prop_assert_eq!(&lines, &by_currency, "statement lines");
            let mut rolled: BTreeMap<String, i64> = BTreeMap::new();
            for (k, s) in &rollup {
                if let Some(c) = &k.currency { *rolled.entry(c.clone()).or_default() += s.charge_micros; }
            }
            let nonzero = |m: &BTreeMap<String, i64>| m.iter().filter(|(_, v)| **v != 0).map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>();
            prop_assert_eq!(nonzero(&rolled), nonzero(&by_currency), "15-minute roll-ups");
            let mut days: BTreeMap<String, i64> = BTreeMap::new();
            for (k, s) in daily.values().flatten() {
                if let Some(c) = &k.currency { *days.entry(c.clone()).or_default() += s.charge_micros; }
            }
            prop_assert_eq!(nonzero(&days), nonzero(&by_currency), "daily roll-ups");
            prop_assert_eq!(log.replayed(), log.state);
        }
    }
}

/// A log with a closed November (seq `seq`) and an event after it, written to a real signed log.
struct SignedStatement {
    log: Log,
    seq: u64,
    _dir: tempfile::TempDir,
    verifier: tally_log::NoteVerifier,
    ledger: tally_log::Ledger,
    note: String,
}

fn signed_statement() -> SignedStatement {
    let mut log = Log::default();
    log.config(budget(""), "2026-10-31T00:00:00Z");
    log.event(&tokens("a", "2026-11-02T00:00:00Z", "gpt-5-mini", 1_000, 10));
    log.event(&event("b", "2026-11-03T00:00:00Z", Some(7), ""));
    let seq = log.close("2026-12-02T00:00:00Z", 24)[0];
    log.event(&event("c", "2026-12-05T00:00:00Z", Some(3), ""));
    let dir = tempfile::tempdir().unwrap();
    let key = tally_log::LedgerKey::generate("tally.example.com").unwrap();
    let verifier = key.signer_for("acme").unwrap().verifier();
    let mut ledger = tally_log::Ledger::open(dir.path(), vec![key]).unwrap();
    for entry in &log.entries {
        ledger.append("acme", entry).unwrap();
    }
    ledger.commit(None).unwrap();
    let note = ledger.checkpoint_note("acme").unwrap();
    SignedStatement { log, seq, _dir: dir, verifier, ledger, note }
}

/// A statement in a real signed log verifies offline from its checkpoint and entry bundle, and
/// every single-byte change of either fails it.
#[test]
fn a_statement_verifies_offline_and_fails_after_any_byte_changes() {
    use tally_log::TenantEntries as _;
    let SignedStatement { log, seq, _dir, verifier, ledger, note } = signed_statement();
    let bundle = ledger.tenant("acme").entry_bundle(0, log.seq() as u16).unwrap();
    let run = |note: &str, bundle: &[u8]| verify_statement(std::slice::from_ref(&verifier), note, &mut |_, _| Ok(bundle.to_vec()), seq);

    let ok = run(&note, &bundle).unwrap();
    assert_eq!((ok.tree_size, ok.origin.as_str()), (log.seq(), "tally.example.com/t/acme"));
    assert_eq!(ok.statement.totals.iter().map(|t| t.micros).sum::<i64>(), 7 + 250 + 20);
    assert!(matches!(run(&note, &bundle[..bundle.len() - 1]), Err(Mismatch::Bundle { .. })));
    assert!(matches!(verify_statement(std::slice::from_ref(&verifier), &note, &mut |_, _| Ok(bundle.clone()), 1), Err(Mismatch::NotAStatement(1))));
    // A source that answers with other bytes the second time (the hashed pass) proves nothing.
    let mut forged = bundle.clone();
    let at = forged.len() - 1;
    forged[at] ^= 0x01;
    let mut reads = 0;
    let mut two_faced = |_, _| {
        reads += 1;
        Ok(if reads == 1 { bundle.clone() } else { forged.clone() })
    };
    assert!(verify_statement(std::slice::from_ref(&verifier), &note, &mut two_faced, seq).is_err());
    for i in 0..bundle.len() {
        let mut changed = bundle.clone();
        changed[i] ^= 0x01;
        assert!(run(&note, &changed).is_err(), "a changed byte {i} of the bundle verified");
    }
    for i in 0..note.len() {
        let mut changed = note.clone().into_bytes();
        changed[i] ^= 0x01;
        if let Ok(changed) = String::from_utf8(changed) {
            assert!(run(&changed, &bundle).is_err(), "a changed byte {i} of the checkpoint verified");
        }
    }
}

/// The same statement verifies from an audit export's evidence (entries from seq 0 with a range
/// proof), and fails after any changed byte of an entry or of the proof, or with entries that
/// do not start at seq 0 or stop before the statement.
#[test]
fn a_statement_verifies_from_an_audit_export() {
    use tally_log::merkle::{range_proof, Hash};
    let SignedStatement { log, seq, _dir, verifier, ledger, note } = signed_statement();
    let size = log.seq();
    let entries = &log.entries[..=seq as usize];
    let proof: Vec<Hash> = range_proof(&ledger.tenant("acme"), 0, seq + 1, size).unwrap();
    let run = |from: u64, entries: &[Vec<u8>], proof: &[Hash]| verify_statement_in_export(std::slice::from_ref(&verifier), &note, from, entries, proof, seq);

    let ok = run(0, entries, &proof).unwrap();
    assert_eq!((ok.tree_size, ok.statement.totals.iter().map(|t| t.micros).sum::<i64>()), (size, 7 + 250 + 20));
    assert_eq!(ok.checked, seq + 1, "what the evidence held, said");
    assert!(!proof.is_empty(), "the test needs records after the statement");
    assert!(matches!(run(0, &entries[..seq as usize], &proof), Err(Mismatch::ExportRange { .. })), "stops before the statement");
    assert!(matches!(run(1, &entries[1..], &proof), Err(Mismatch::ExportRange { .. })), "does not start at seq 0");
    for (i, entry) in entries.iter().enumerate() {
        for byte in 0..entry.len() {
            let mut changed = entries.to_vec();
            changed[i][byte] ^= 0x01;
            assert!(run(0, &changed, &proof).is_err(), "a changed byte {byte} of entry {i} verified");
        }
    }
    let mut bad_proof = proof.clone();
    bad_proof[0][0] ^= 0x01;
    assert!(matches!(run(0, entries, &bad_proof), Err(Mismatch::Root)));
    assert!(matches!(run(0, entries, &proof[1..]), Err(Mismatch::Root)));
}

/// A record from before rating (no `charge`) still counts against the budget as it did, but no
/// statement bills it: statements sum recorded charges only, as their verifier does, so an
/// upgrade opens no past period.
#[test]
fn records_from_before_rating_count_against_budgets_but_open_no_statement() {
    let mut log = Log::default();
    log.config(budget("period_micros = 10_000_000\n"), "2026-10-31T00:00:00Z");
    let old = tokens("old", "2026-11-02T09:00:00Z", "gpt-5-mini", 1_000_000, 0);
    let source = tally_log::Source::File { file: "old.jsonl".into(), line: 1 };
    let input = tally_log::EventInput { event: &old, ce_source: None, payload_sha256: &[0; 32], source: &source };
    log.entries.push(tally_log::event_record(log.seq(), input, None).unwrap());
    let state = log.replayed();
    let period = state.levels(ts("2026-11-03T00:00:00Z"), None).into_iter().find(|l| l.level == Level::Period).unwrap();
    assert_eq!(period.spent_micros, 250_000, "rated from the table, as budgets did");
    assert!(state.statements_due(ts("2027-06-01T00:00:00Z"), jiff::SignedDuration::ZERO).is_empty());
}

/// An event dated at the end of time opens a period that never closes, and never disturbs the
/// closing of the periods before it: November still closes alone, and December's events are not
/// corrections of anything.
#[test]
fn an_event_dated_9999_never_closes_and_never_disturbs_billing() {
    let mut log = Log::default();
    log.config(budget(""), "2026-10-31T00:00:00Z");
    log.event(&event("far", "9999-12-15T00:00:00Z", Some(5), ""));
    log.event(&event("nov", "2026-11-02T00:00:00Z", Some(7), ""));
    let due = log.state.statements_due(Timestamp::MAX, jiff::SignedDuration::ZERO);
    assert_eq!(due.iter().map(|s| s.period.to_string()).collect::<Vec<_>>(), ["2026-11-01"], "{due:?}");
    log.close("2026-12-02T00:00:00Z", 24);
    let dec = log.state.rate(&event("dec", "2026-12-05T00:00:00Z", Some(3), "")).unwrap();
    assert_eq!((dec.period.as_str(), dec.corrects), ("2026-12-01", None));
}
