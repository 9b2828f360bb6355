//! The budget fold end to end, without I/O: decisions, admissions, expiry, replay.

use jiff::Timestamp;
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
        self.entries.push(tally_log::event_record(self.seq(), input).unwrap());
        let decisions = self.state.apply_event(e);
        for d in &decisions {
            let seq = self.seq();
            self.push_budget(BudgetRecord::Budget { seq, decision: d.clone() });
        }
        decisions
    }

    fn authorize(&mut self, now: &str, task: Option<&str>, estimate: i64, ttl_ms: i64) -> (Verdict, Option<String>) {
        let now = ts(now);
        let verdict = self.state.authorize(now, task, estimate);
        let calendar = self.state.budget().unwrap().calendar().unwrap();
        let seq = self.seq();
        let id = verdict.allowed.then(|| format!("res-{seq}"));
        let admission = Admission {
            at: now,
            allowed: verdict.allowed,
            task_id: task.map(str::to_string),
            estimate_micros: estimate,
            reservation_id: id.clone(),
            expires_at: verdict.allowed.then(|| now + jiff::SignedDuration::from_millis(ttl_ms)),
            denied_by: verdict.denied_by,
            day: calendar.day(now),
            period: calendar.period(now),
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
            assert_eq!(v.denied_by, Some(Level::Period));
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
        release: Release { at: ts("2026-11-02T10:00:00.500Z"), reservation_id: id.unwrap(), reason: ReleaseReason::Expired },
    });
    assert!(log.authorize("2026-11-02T10:00:01Z", None, 1_000, 500).0.allowed, "no phantom denial");
}

#[test]
fn the_most_specific_level_denies_and_remaining_is_reported() {
    let mut log = Log::default();
    log.config(budget("task_micros = 300\nday_micros = 1_000\nperiod_micros = 10_000\n"), "2026-11-01T00:00:00Z");
    log.event(&event("e1", "2026-11-02T09:00:00Z", Some(250), r#","task_id":"t1""#));
    let (v, _) = log.authorize("2026-11-02T10:00:00Z", Some("t1"), 100, 1_000);
    assert_eq!(v.denied_by, Some(Level::Task));
    let task = &v.levels[0];
    assert_eq!((task.level, task.remaining_micros), (Level::Task, Some(50)));
    let (v, _) = log.authorize("2026-11-02T10:00:00Z", None, 800, 1_000);
    assert_eq!(v.denied_by, Some(Level::Day));
}

#[test]
fn windows_restore_when_they_end_and_config_changes_take_effect() {
    let mut log = Log::default();
    log.config(budget("day_micros = 1_000\ntime_zone = \"Europe/Berlin\"\n"), "2026-11-01T00:00:00Z");
    log.event(&event("e1", "2026-11-02T09:00:00Z", Some(1_000), ""));
    assert_eq!(log.state.status(ts("2026-11-02T10:00:00Z"), None), "exceeded");
    assert!(log.state.restorations_due(ts("2026-11-02T22:59:59Z")).is_empty());
    // Berlin's next midnight is 23:00 UTC.
    assert_eq!(log.state.next_wakeup(), Some(ts("2026-11-02T23:00:00Z")));
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
    let known = event("e1", "2026-11-02T09:00:00Z", None, r#","action":"gpt-5-mini","usage":{"input_tokens":1000000,"output_tokens":1000}"#);
    assert_eq!(charge(&known, &b), (250_000 + 2_000, Basis::Table));
    let unknown = event("e2", "2026-11-02T09:00:00Z", None, r#","action":"mystery-9","usage":{"input_tokens":1000,"output_tokens":1000}"#);
    assert_eq!(charge(&unknown, &b), (10_000 + 30_000, Basis::Ceiling));
    let priced = event("e3", "2026-11-02T09:00:00Z", Some(7), r#","action":"mystery-9","usage":{"input_tokens":1000,"output_tokens":1000}"#);
    assert_eq!(charge(&priced, &b), (7, Basis::Cost));
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
        at: ts("2026-11-02T10:00:00Z"),
        allowed: true,
        task_id: None,
        estimate_micros: 5,
        reservation_id: Some("res-0".into()),
        expires_at: Some(ts("2026-11-02T10:00:01Z")),
        denied_by: None,
        day: "2026-11-02".parse().unwrap(),
        period: "2026-11-01".parse().unwrap(),
    };
    state.apply_record(&BudgetRecord::Admission { seq: 0, admission });
    assert_eq!(state.next_wakeup(), Some(ts("2026-11-02T10:00:01Z")));
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
