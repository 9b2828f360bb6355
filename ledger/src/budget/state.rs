//! A tenant's budget state as a fold over its log (docs/budgets.md), and the records that change it.
//!
//! Inputs are log records only: `config` (the effective budget), `event` (spend, by event time,
//! in the event's own day and period; a `reservation_id` settles that reservation), `admission`
//! (an authorize decision; an allow holds its estimate at every level until settled, released or
//! expired), `release`, and `budget` (a decision already announced). Wall-clock time enters only
//! through records (an admission's `at`, an expiry's `release`), so replaying a log gives the same
//! state and, for each event, the same decisions.
//!
//! Decisions: after an event, each level whose scope (task id, day, period) reached its limit is
//! `exceeded`, or past the soft threshold `warning`, once per scope and window. When a window an
//! announcement was made for has ended, or a new config lifts the limit above spend, `restored`.
//! "Reached" means spent ≥ limit: at that point nothing more can be admitted.

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::Date;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tally_schemas::Event;

use super::config::TenantBudget;
use super::window::Calendar;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Task,
    Day,
    Period,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Task => "task",
            Level::Day => "day",
            Level::Period => "period",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Warning,
    Exceeded,
    Restored,
}

/// A `budget` record's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetDecision {
    pub at: Timestamp,
    pub status: Status,
    pub level: Level,
    /// The task id, the day (`YYYY-MM-DD`) or the period's first day.
    pub scope: String,
    pub limit_micros: i64,
    pub spent_micros: i64,
}

/// An `admission` record's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    pub at: Timestamp,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub estimate_micros: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// The level that denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<Level>,
    pub day: Date,
    pub period: Date,
}

/// Why a reservation stopped holding budget without an event settling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseReason {
    Released,
    Expired,
}

/// A `release` record's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub at: Timestamp,
    pub reservation_id: String,
    pub reason: ReleaseReason,
}

/// The budget-side records, as stored: `{"seq":…,"type":…,<content>}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BudgetRecord {
    Config {
        seq: u64,
        at: Timestamp,
        budget: TenantBudget,
    },
    Budget {
        seq: u64,
        #[serde(flatten)]
        decision: BudgetDecision,
    },
    Admission {
        seq: u64,
        #[serde(flatten)]
        admission: Admission,
    },
    Release {
        seq: u64,
        #[serde(flatten)]
        release: Release,
    },
}

impl BudgetRecord {
    /// The entry bytes, through the log core's record codec (which applies the entry size limit).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(tally_log::budget_record(self)?)
    }
}

/// How an event's spend was determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The event carried its cost.
    Cost,
    /// Priced from the tenant's table (tokens × model price).
    Table,
    /// The model is not in the table: charged at the ceiling price, and flagged.
    Ceiling,
    /// Nothing to charge (no cost, no tokens).
    None,
}

/// What an event costs under `budget`.
pub fn charge(event: &Event, budget: &TenantBudget) -> (i64, Basis) {
    if let Some(cost) = &event.cost {
        return (cost.amount_micros, Basis::Cost);
    }
    let Some(usage) = &event.usage else { return (0, Basis::None) };
    match event.action.as_ref().and_then(|model| budget.prices.get(model)) {
        Some(price) => (price.charge(usage.input_tokens, usage.output_tokens), Basis::Table),
        None => match &budget.ceiling {
            Some(ceiling) => (ceiling.charge(usage.input_tokens, usage.output_tokens), Basis::Ceiling),
            // No budget configured at all: nothing is enforced, so nothing is charged.
            None => (0, Basis::None),
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    task_id: Option<String>,
    amount: i64,
    expires_at: Timestamp,
    day: Date,
    period: Date,
}

/// Per level at one instant: for `GET …/budget` and `tally.budget`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LevelState {
    pub level: Level,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_micros: Option<i64>,
    pub spent_micros: i64,
    pub reserved_micros: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_micros: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Timestamp>,
}

/// The answer to an authorize request, before it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub denied_by: Option<Level>,
    pub levels: Vec<LevelState>,
}

/// The tenant's calendar, derived from its budget and kept so the hot path never looks up a
/// time zone. Not part of the state's identity or its serialized form.
#[derive(Debug, Clone, Default)]
struct CalendarCache(Option<Calendar>);

impl PartialEq for CalendarCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for CalendarCache {}

/// One tenant's budget state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetState {
    budget: Option<TenantBudget>,
    #[serde(skip)]
    calendar: CalendarCache,
    spent_task: BTreeMap<String, i64>,
    spent_day: BTreeMap<Date, i64>,
    spent_period: BTreeMap<Date, i64>,
    reservations: BTreeMap<String, Reservation>,
    /// Sums of `reservations` per scope, and their expiry order: O(log n) admissions.
    reserved_task: BTreeMap<String, i64>,
    reserved_day: BTreeMap<Date, i64>,
    reserved_period: BTreeMap<Date, i64>,
    expiries: BTreeSet<(Timestamp, String)>,
    /// (level, scope, status) already announced and not since restored.
    announced: BTreeSet<(Level, String, Status)>,
    /// Per task: the latest billing period it was charged in (see `forget_ended_tasks`).
    #[serde(default)]
    task_period: BTreeMap<String, Date>,
    /// The latest billing period any event was charged in.
    #[serde(default)]
    latest_period: Option<Date>,
    /// Events charged at the ceiling price because their model had no price.
    pub ceiling_priced: u64,
}

impl BudgetState {
    pub fn budget(&self) -> Option<&TenantBudget> {
        self.budget.as_ref()
    }

    /// Rebuilds what deserialization leaves out (the calendar).
    pub fn restore_cache(&mut self) {
        self.calendar = CalendarCache(self.budget.as_ref().and_then(|b| b.calendar().ok()));
    }

    /// The tenant's calendar, if it has a budget.
    pub fn calendar(&self) -> Option<Calendar> {
        if let Some(c) = &self.calendar.0 {
            return Some(c.clone());
        }
        self.budget.as_ref().and_then(|b| b.calendar().ok())
    }

    /// Adds (sign 1) or removes (sign -1) a reservation's amounts from the per-scope sums.
    fn account(&mut self, id: &str, r: &Reservation, sign: i64) {
        fn add<K: Ord>(m: &mut BTreeMap<K, i64>, k: K, v: i64) {
            let e = m.entry(k).or_default();
            *e = e.saturating_add(v);
        }
        if let Some(t) = &r.task_id {
            add(&mut self.reserved_task, t.clone(), sign * r.amount);
            self.reserved_task.retain(|_, v| *v != 0);
        }
        add(&mut self.reserved_day, r.day, sign * r.amount);
        add(&mut self.reserved_period, r.period, sign * r.amount);
        self.reserved_day.retain(|_, v| *v != 0);
        self.reserved_period.retain(|_, v| *v != 0);
        if sign > 0 {
            self.expiries.insert((r.expires_at, id.to_string()));
        } else {
            self.expiries.remove(&(r.expires_at, id.to_string()));
        }
    }

    fn remove_reservation(&mut self, id: &str) {
        if let Some(r) = self.reservations.remove(id) {
            self.account(id, &r, -1);
        }
    }

    fn limit(&self, level: Level) -> Option<i64> {
        let b = self.budget.as_ref()?;
        match level {
            Level::Task => b.task_micros,
            Level::Day => b.day_micros,
            Level::Period => b.period_micros,
        }
    }

    fn spent(&self, level: Level, scope: &str) -> i64 {
        let by_date = |m: &BTreeMap<Date, i64>| scope.parse::<Date>().ok().and_then(|d| m.get(&d).copied()).unwrap_or(0);
        match level {
            Level::Task => self.spent_task.get(scope).copied().unwrap_or(0),
            Level::Day => by_date(&self.spent_day),
            Level::Period => by_date(&self.spent_period),
        }
    }

    fn reserved(&self, level: Level, scope: &str) -> i64 {
        let by_date = |m: &BTreeMap<Date, i64>| scope.parse::<Date>().ok().and_then(|d| m.get(&d).copied()).unwrap_or(0);
        match level {
            Level::Task => self.reserved_task.get(scope).copied().unwrap_or(0),
            Level::Day => by_date(&self.reserved_day),
            Level::Period => by_date(&self.reserved_period),
        }
    }

    /// Folds entry `seq` of the tenant's log (any record type), decoded by the log core's one
    /// record codec. Returns the decisions an event record triggers; the ledger appends them right
    /// after it, and replays check they are there.
    pub fn fold(&mut self, seq: u64, entry: &[u8]) -> Result<Vec<BudgetDecision>> {
        match tally_log::Record::<BudgetRecord>::decode(seq, entry)? {
            // Conflicts are not charged: the first record with that key was.
            tally_log::Record::Event(r) if r.is_conflict() => Ok(Vec::new()),
            tally_log::Record::Event(r) => Ok(self.apply_event(&r.event)),
            tally_log::Record::Budget(r) => {
                self.apply_record(&r);
                Ok(Vec::new())
            }
        }
    }

    /// Applies a budget-side record.
    pub fn apply_record(&mut self, record: &BudgetRecord) {
        match record {
            BudgetRecord::Config { budget, .. } => {
                self.budget = Some(budget.clone());
                self.calendar = CalendarCache(budget.calendar().ok());
            }
            BudgetRecord::Budget { decision, .. } => {
                let key = (decision.level, decision.scope.clone());
                if decision.status == Status::Restored {
                    self.announced.retain(|(l, s, _)| (*l, s.clone()) != key);
                } else {
                    self.announced.insert((key.0, key.1, decision.status));
                }
            }
            BudgetRecord::Admission { admission: a, .. } => {
                if let (true, Some(id), Some(expires_at)) = (a.allowed, &a.reservation_id, a.expires_at) {
                    let r = Reservation { task_id: a.task_id.clone(), amount: a.estimate_micros, expires_at, day: a.day, period: a.period };
                    self.remove_reservation(id);
                    self.account(id, &r, 1);
                    self.reservations.insert(id.clone(), r);
                }
            }
            BudgetRecord::Release { release, .. } => {
                self.remove_reservation(&release.reservation_id);
            }
        }
    }

    /// Charges an event in its own day and period (and task); settles its reservation.
    pub fn apply_event(&mut self, event: &Event) -> Vec<BudgetDecision> {
        if let Some(id) = &event.reservation_id {
            self.remove_reservation(id);
        }
        let (Some(budget), Some(calendar)) = (self.budget.clone(), self.calendar()) else { return Vec::new() };
        let (micros, basis) = charge(event, &budget);
        if basis == Basis::Ceiling {
            self.ceiling_priced += 1;
        }
        let at = event.occurred_at;
        let (day, period) = (calendar.day(at), calendar.period(at));
        // Saturating: a hostile or broken amount near i64::MAX must pin spend at "exhausted",
        // never wrap it negative.
        for spent in [self.spent_day.entry(day).or_default(), self.spent_period.entry(period).or_default()] {
            *spent = spent.saturating_add(micros);
        }
        if let Some(t) = &event.task_id {
            let spent = self.spent_task.entry(t.clone()).or_default();
            *spent = spent.saturating_add(micros);
            let last = self.task_period.entry(t.clone()).or_insert(period);
            *last = (*last).max(period);
        }
        if self.latest_period.is_none_or(|p| period > p) {
            self.latest_period = Some(period);
            self.forget_ended_tasks(period);
        }
        let mut decisions = Vec::new();
        let scopes = [(Level::Task, event.task_id.clone()), (Level::Day, Some(day.to_string())), (Level::Period, Some(period.to_string()))];
        for (level, scope) in scopes {
            let (Some(scope), Some(limit)) = (scope, self.limit(level)) else { continue };
            let spent = self.spent(level, &scope);
            let announced = |s: Status| self.announced.contains(&(level, scope.clone(), s));
            let status = if spent >= limit {
                (!announced(Status::Exceeded)).then_some(Status::Exceeded)
            } else if budget.soft_threshold_bp.is_some_and(|bp| i128::from(spent) * 10_000 >= i128::from(limit) * i128::from(bp)) {
                (!announced(Status::Warning) && !announced(Status::Exceeded)).then_some(Status::Warning)
            } else {
                None
            };
            if let Some(status) = status {
                decisions.push(BudgetDecision { at, status, level, scope, limit_micros: limit, spent_micros: spent });
            }
        }
        decisions
    }

    /// A task's total lives within a billing period (task ⊂ day ⊂ period): once an event opens a
    /// new period, tasks last charged in an earlier one and holding no reservation are forgotten,
    /// with their announcements, so the state does not grow with every task id ever seen. A task
    /// id charged again later starts from 0. Driven by the events' own times, never the clock,
    /// so a replay forgets exactly the same tasks. Tasks from a snapshot taken before this rule
    /// (no recorded period) count as charged in the period that triggers the sweep.
    fn forget_ended_tasks(&mut self, current: Date) {
        let ended: BTreeSet<String> = self
            .spent_task
            .keys()
            .filter(|t| *self.task_period.entry((*t).clone()).or_insert(current) < current && !self.reserved_task.contains_key(*t))
            .cloned()
            .collect();
        for t in &ended {
            self.spent_task.remove(t);
            self.task_period.remove(t);
        }
        self.announced.retain(|(level, scope, _)| *level != Level::Task || !ended.contains(scope));
    }

    /// `restored` decisions due at `now`: announcements whose day or period has ended, and
    /// exceeded scopes whose (new) limit is above their spend.
    pub fn restorations_due(&self, now: Timestamp) -> Vec<BudgetDecision> {
        let Some(calendar) = self.calendar() else {
            // No budget any more: everything announced is void.
            return self
                .announced_scopes()
                .into_iter()
                .map(|(level, scope)| BudgetDecision { at: now, status: Status::Restored, level, scope, limit_micros: 0, spent_micros: 0 })
                .collect();
        };
        let (today, this_period) = (calendar.day(now).to_string(), calendar.period(now).to_string());
        let mut out = Vec::new();
        for (level, scope) in self.announced_scopes() {
            let spent = self.spent(level, &scope);
            let limit = self.limit(level);
            let window_over = match level {
                Level::Task => false,
                Level::Day => scope < today,
                Level::Period => scope < this_period,
            };
            let lifted = self.announced.contains(&(level, scope.clone(), Status::Exceeded)) && limit.is_none_or(|l| spent < l);
            if window_over || lifted {
                let at = match (level, scope.parse::<Date>()) {
                    (Level::Day, Ok(d)) if window_over => calendar.start_of(d.tomorrow().unwrap_or(d)),
                    (Level::Period, Ok(d)) if window_over => calendar.start_of(calendar.next_period(d)),
                    _ => now,
                };
                out.push(BudgetDecision { at, status: Status::Restored, level, scope, limit_micros: limit.unwrap_or(0), spent_micros: spent });
            }
        }
        out
    }

    fn announced_scopes(&self) -> BTreeSet<(Level, String)> {
        self.announced.iter().map(|(l, s, _)| (*l, s.clone())).collect()
    }

    /// Reservations whose TTL has passed at `now`.
    pub fn expired(&self, now: Timestamp) -> Vec<String> {
        self.expiries.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| id.clone()).collect()
    }

    /// Tasks holding a reservation now.
    pub fn open_tasks(&self) -> impl Iterator<Item = &str> {
        self.reserved_task.iter().filter(|(_, v)| **v > 0).map(|(k, _)| k.as_str())
    }

    pub fn has_reservation(&self, id: &str) -> bool {
        self.reservations.contains_key(id)
    }

    /// When the next time-driven change (an expiry or a window end with an announcement) is due.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        let expiry = self.expiries.first().map(|(at, _)| *at);
        let Some(calendar) = self.calendar() else { return expiry };
        let window = self
            .announced
            .iter()
            .filter_map(|(level, scope, _)| {
                let d = scope.parse::<Date>().ok()?;
                match level {
                    Level::Day => Some(calendar.start_of(d.tomorrow().ok()?)),
                    Level::Period => Some(calendar.start_of(calendar.next_period(d))),
                    Level::Task => None,
                }
            })
            .min();
        [expiry, window].into_iter().flatten().min()
    }

    /// Spend, reservations and remaining budget per level at `now` (task level when `task_id`).
    pub fn levels(&self, now: Timestamp, task_id: Option<&str>) -> Vec<LevelState> {
        let Some(calendar) = self.calendar() else { return Vec::new() };
        let mut out = Vec::new();
        let scopes = [
            (Level::Task, task_id.map(str::to_string), None),
            (Level::Day, Some(calendar.day(now).to_string()), Some(calendar.day_ends(now))),
            (Level::Period, Some(calendar.period(now).to_string()), Some(calendar.period_ends(now))),
        ];
        for (level, scope, resets_at) in scopes {
            let Some(scope) = scope else { continue };
            let limit = self.limit(level);
            let spent = self.spent(level, &scope);
            let reserved = self.reserved(level, &scope);
            out.push(LevelState {
                level,
                limit_micros: limit,
                spent_micros: spent,
                reserved_micros: reserved,
                remaining_micros: limit.map(|l| l.saturating_sub(spent).saturating_sub(reserved).max(0)),
                resets_at,
                scope,
            });
        }
        out
    }

    /// Would `estimate` fit at every level now? The most specific level that says no denies.
    pub fn authorize(&self, now: Timestamp, task_id: Option<&str>, estimate: i64) -> Verdict {
        let levels = self.levels(now, task_id);
        let denied_by = levels
            .iter()
            .find(|l| l.limit_micros.is_some_and(|limit| i128::from(l.spent_micros) + i128::from(l.reserved_micros) + i128::from(estimate) > i128::from(limit)))
            .map(|l| l.level);
        Verdict { allowed: denied_by.is_none(), denied_by, levels }
    }

    /// `ok`, `warning` or `exceeded` for the current windows (and the task, when given).
    pub fn status(&self, now: Timestamp, task_id: Option<&str>) -> &'static str {
        let soft = self.budget.as_ref().and_then(|b| b.soft_threshold_bp);
        let mut status = "ok";
        for l in self.levels(now, task_id) {
            let Some(limit) = l.limit_micros else { continue };
            if l.spent_micros >= limit {
                return "exceeded";
            }
            if soft.is_some_and(|bp| i128::from(l.spent_micros) * 10_000 >= i128::from(limit) * i128::from(bp)) {
                status = "warning";
            }
        }
        status
    }
}
