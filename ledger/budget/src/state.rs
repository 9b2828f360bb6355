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
use tally_log::{Charge, ChargeBasis};
use tally_schemas::Event;

use super::config::{QuotaSelector, TenantBudget};
use super::rating::{rate, Catalog};
use super::statement::{OpenPeriods, Statement, MAX_LISTED_STATEMENTS};
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

/// What a limit counts beside money: tokens (an event's input + output tokens; an admission's
/// `estimated_tokens`) or calls (one per event; one per admission).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Tokens,
    Calls,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Calls => "calls",
        }
    }
}

/// The key of a token or call sum: `<unit>/<level>/<scope>` (a string: snapshots are JSON).
fn unit_key(unit: Unit, level: Level, scope: &str) -> String {
    format!("{}/{}/{}", unit.as_str(), level.as_str(), scope)
}

/// What denied an admission: a level with no room, or a freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeniedBy {
    Task,
    Day,
    Period,
    /// An active freeze covers the request (the admission names it in `freeze_id`).
    Freeze,
    /// The request alone costs more than a rate quota allows in a whole window: no retry helps.
    Quota,
}

impl From<Level> for DeniedBy {
    fn from(level: Level) -> Self {
        match level {
            Level::Task => DeniedBy::Task,
            Level::Day => DeniedBy::Day,
            Level::Period => DeniedBy::Period,
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
    /// The level that denied, or `freeze`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<DeniedBy>,
    /// When a token or call limit denied (absent: money).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_unit: Option<Unit>,
    pub day: Date,
    pub period: Date,
    /// An allowed admission whose `[at, expires_at]` crosses midnight or a period boundary holds
    /// its estimate in those later windows too: its event may be charged to any of them
    /// (docs/budgets.md, "Window edges").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_days: Vec<Date>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_periods: Vec<Date>,
    /// The agent and action the request named (what a freeze's scope is matched against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_tokens: Option<u64>,
    /// The rate quota that throttled it (its key), and when its window ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The freeze that denied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_id: Option<String>,
    /// The caller's `Idempotency-Key` and what it asked, so a retry gets this answer again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// The name of the token that asked (from the token file; `anonymous` without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// An authorize request's content (docs/budgets.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizeRequest {
    pub task_id: Option<String>,
    /// The agent, the action (a model or tool) and the kind of call about to run: what freezes
    /// and rate quotas are matched against.
    pub agent_id: Option<String>,
    pub action: Option<String>,
    pub kind: Option<String>,
    pub estimate_micros: i64,
    /// Counted against `tokens` quotas.
    pub estimated_tokens: Option<u64>,
    pub ttl_ms: i64,
}

/// A keyed request as recorded: the caller's key and the SHA-256 of the request it named, so a
/// retry (same key, same request) is answered from the record and a reuse of the key for
/// another request is refused (docs/budgets.md, "Idempotent admission").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Idempotency {
    pub key: String,
    pub request_sha256: String,
}

impl Idempotency {
    /// An authorize request: every field of it.
    pub fn for_authorize(key: &str, r: &AuthorizeRequest) -> Self {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let tokens = r.estimated_tokens.map(|t| t.to_string()).unwrap_or_default();
        let parts = [text(&r.task_id), text(&r.agent_id), text(&r.action), text(&r.kind), r.estimate_micros.to_string(), tokens, r.ttl_ms.to_string()];
        let mut all = vec!["authorize"];
        all.extend(parts.iter().map(String::as_str));
        Self::hashed(key, &all)
    }

    /// A release request: its reservation.
    pub fn for_release(key: &str, reservation_id: &str) -> Self {
        Self::hashed(key, &["release", reservation_id])
    }

    #[cfg(test)]
    pub(crate) fn hashed_for_test(key: &str, parts: &[&str]) -> String {
        Self::hashed(key, parts).request_sha256
    }

    fn hashed(key: &str, parts: &[&str]) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in parts {
            // Length-prefixed, so no two different requests hash the same bytes.
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        Idempotency { key: key.to_string(), request_sha256: hex::encode(h.finalize()) }
    }
}

/// How long a key is remembered after its first use, and how many keys a tenant's state keeps:
/// a retry is recognised within 24 h, as long as the tenant has used fewer than 10,000 newer keys.
pub const REMEMBER_KEYS_FOR: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);
pub const MAX_REMEMBERED_KEYS: usize = 10_000;

/// What a keyed request was answered, for its retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remembered {
    pub request_sha256: String,
    /// The record that answered it.
    pub seq: u64,
    pub at: Timestamp,
    /// The admission (without its idempotency and token), or `None` for a release.
    pub admission: Option<Admission>,
}

/// What a freeze stops (docs/budgets.md, "Kill switch"): every field it names must match; an
/// empty scope is the whole tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeScope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

impl FreezeScope {
    pub fn is_empty(&self) -> bool {
        self.agent_id.is_none() && self.action.is_none() && self.task_id.is_none()
    }

    /// Whether a request or event naming these values is inside the scope. A field the scope
    /// names and the request leaves out counts as inside: fail closed, since nothing shows the
    /// request is outside.
    pub fn covers(&self, agent_id: Option<&str>, action: Option<&str>, task_id: Option<&str>) -> bool {
        fn field(scope: &Option<String>, value: Option<&str>) -> bool {
            match (scope, value) {
                (Some(s), Some(v)) => s == v,
                _ => true,
            }
        }
        field(&self.agent_id, agent_id) && field(&self.action, action) && field(&self.task_id, task_id)
    }
}

/// A `freeze` record's content: from its seq on, every authorize in its scope is denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    pub at: Timestamp,
    /// `frz-<seq>`, the seq of the record.
    pub freeze_id: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "FreezeScope::is_empty")]
    pub scope: FreezeScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// An `unfreeze` record's content: the freeze stops at this seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unfreeze {
    pub at: Timestamp,
    pub freeze_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A `flag` record's content: the event at `event_seq` arrived inside an active freeze's scope.
/// The event itself is recorded and charged as any other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    /// The event's `occurred_at`.
    pub at: Timestamp,
    pub event_seq: u64,
    pub flag: FlagKind,
    pub freeze_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagKind {
    Frozen,
}

/// The most freezes a tenant may have active at once: every authorize checks them all.
pub const MAX_ACTIVE_FREEZES: usize = 256;

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
    /// As in [`Admission`]: set on a keyed `release` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// The token that released it; absent on an expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
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
    Freeze {
        seq: u64,
        #[serde(flatten)]
        freeze: Freeze,
    },
    Unfreeze {
        seq: u64,
        #[serde(flatten)]
        unfreeze: Unfreeze,
    },
    Flag {
        seq: u64,
        #[serde(flatten)]
        flag: Flag,
    },
    Statement {
        seq: u64,
        #[serde(flatten)]
        statement: Statement,
    },
    /// Personal values erased (docs/privacy.md); no budget state depends on them.
    Erasure {
        seq: u64,
        #[serde(flatten)]
        erasure: tally_log::Erasure,
    },
}

impl BudgetRecord {
    /// The entry bytes, through the log core's record codec (which applies the entry size limit).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(tally_log::budget_record(self)?)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    task_id: Option<String>,
    amount: i64,
    expires_at: Timestamp,
    day: Date,
    period: Date,
    /// Later windows its span reaches (the admission's `more_days`, `more_periods`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more_days: Vec<Date>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more_periods: Vec<Date>,
    /// The tokens and the call it holds, when the budget limited those units at its admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    held_call: bool,
}

impl Reservation {
    /// Every (level, scope) the reservation holds in.
    fn scopes(&self) -> Vec<(Level, String)> {
        let mut out: Vec<(Level, String)> = self.task_id.iter().map(|t| (Level::Task, t.clone())).collect();
        out.extend(std::iter::once(self.day).chain(self.more_days.iter().copied()).map(|d| (Level::Day, d.to_string())));
        out.extend(std::iter::once(self.period).chain(self.more_periods.iter().copied()).map(|p| (Level::Period, p.to_string())));
        out
    }
}

/// One unit at one level, where the budget limits it: for `levels` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitState {
    pub limit: u64,
    pub spent: u64,
    pub reserved: u64,
    pub remaining: u64,
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
    /// Tokens and calls at this level, when the budget limits them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<UnitState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<UnitState>,
}

/// The answer to an authorize request, before it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub denied_by: Option<DeniedBy>,
    /// A rate quota with no room left in its window (its key), and the milliseconds until the
    /// window ends; `allowed` is then false and `denied_by` none.
    pub throttled: Option<(String, u64)>,
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

/// The rules the fold applies to existing records. A snapshot taken under older rules is not
/// loaded: the tenant's log is folded again from its start (`PartitionLedger::open`). Version 2:
/// a cost in another currency than the budget's is no longer charged.
/// Version 3: events are charged what their record says (rated once, in the log), and the
/// state keeps the seq of the `config` in force.
/// Version 4: open periods count their events' tokens (statement lines carry them).
/// Version 5: the state keeps its records' latest input time (the clock periods close on).
pub const FOLD_VERSION: u32 = 5;

/// The fold version a snapshot was written under; always written as [`FOLD_VERSION`], read as
/// stored (absent: 0). Not part of a state's identity.
#[derive(Debug, Clone, Copy, Default)]
struct FoldVersion(u32);

impl PartialEq for FoldVersion {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for FoldVersion {}

impl Serialize for FoldVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u32(FOLD_VERSION)
    }
}

impl<'de> Deserialize<'de> for FoldVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        u32::deserialize(d).map(FoldVersion)
    }
}

/// One tenant's budget state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetState {
    #[serde(default)]
    fold_version: FoldVersion,
    budget: Option<TenantBudget>,
    /// The seq of the `config` record that put `budget` in force: the catalog version.
    #[serde(default)]
    config_seq: Option<u64>,
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
    /// Events whose cost was in another currency than the budget's, so not charged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub foreign_currency_events: u64,
    /// Keyed requests by key, for their retries; bounded by `REMEMBER_KEYS_FOR` and
    /// `MAX_REMEMBERED_KEYS`, pruned by the records' own times so a replay keeps the same keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    remembered: BTreeMap<String, Remembered>,
    /// The same keys by the seq of their record, oldest first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    remembered_order: BTreeMap<u64, String>,
    /// Active freezes by id (at most `MAX_ACTIVE_FREEZES`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    freezes: BTreeMap<String, Freeze>,
    /// Whether the tenant was ever frozen: a new owner republishes its state, so a lost
    /// unfreeze message cannot leave the topic showing a freeze for good.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ever_frozen: bool,
    /// Per rate quota key: the start of its current window and what allowed admissions used in it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    quota_used: BTreeMap<String, (Timestamp, u64)>,
    /// Tokens and calls spent (events) and reserved (admissions), by [`unit_key`]; counted only
    /// for units the budget limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    unit_spent: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    unit_reserved: BTreeMap<String, u64>,
    /// Charges of billing periods not yet closed by a `statement`, by period.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    open_periods: OpenPeriods,
    /// The latest period a `statement` closed: a charge for it or an earlier one is a correction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    closed_through: Option<Date>,
    /// Statement seqs by period, the latest `MAX_LISTED_STATEMENTS`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    statements: BTreeMap<Date, u64>,
    /// The latest [`tally_log::input_time`] of the tenant's `event` and `conflict` records: the
    /// partition's input clock, on which periods close, is the latest of its tenants'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_time: Option<Timestamp>,
}

impl BudgetState {
    pub fn budget(&self) -> Option<&TenantBudget> {
        self.budget.as_ref()
    }

    /// Whether a deserialized snapshot was folded under today's rules ([`FOLD_VERSION`]).
    pub fn is_current_fold(&self) -> bool {
        self.fold_version.0 == FOLD_VERSION
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
        for day in std::iter::once(r.day).chain(r.more_days.iter().copied()) {
            add(&mut self.reserved_day, day, sign * r.amount);
        }
        for period in std::iter::once(r.period).chain(r.more_periods.iter().copied()) {
            add(&mut self.reserved_period, period, sign * r.amount);
        }
        self.reserved_day.retain(|_, v| *v != 0);
        self.reserved_period.retain(|_, v| *v != 0);
        let held = [(Unit::Tokens, r.held_tokens.unwrap_or(0)), (Unit::Calls, u64::from(r.held_call))];
        for (level, scope) in r.scopes() {
            for (unit, amount) in held.into_iter().filter(|(_, a)| *a > 0) {
                let key = unit_key(unit, level, &scope);
                let e = self.unit_reserved.entry(key.clone()).or_default();
                *e = if sign > 0 { e.saturating_add(amount) } else { e.saturating_sub(amount) };
                if *e == 0 {
                    self.unit_reserved.remove(&key);
                }
            }
        }
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

    pub(crate) fn spent(&self, level: Level, scope: &str) -> i64 {
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
        let record = tally_log::Record::<BudgetRecord>::decode(seq, entry)?;
        if let tally_log::Record::Event(r) = &record {
            self.observe_input(r.input_time());
        }
        match record {
            // Conflicts are not charged: the first record with that key was.
            tally_log::Record::Event(r) if r.is_conflict() => Ok(Vec::new()),
            tally_log::Record::Event(r) => match &r.charge {
                Some(charge) => Ok(self.apply_event(seq, &r.event, Some(charge))),
                // Written before rating moved into the log: budgets rate it as they did then, but
                // no statement bills it (a statement sums recorded charges only, as its verifier
                // does), so an upgrade opens no past period.
                None => {
                    let rated = self.rate(&r.event);
                    Ok(self.count_event(&r.event, rated.as_ref()))
                }
            },
            tally_log::Record::Budget(r) => {
                self.apply_record(&r);
                Ok(Vec::new())
            }
        }
    }

    /// Applies a budget-side record.
    pub fn apply_record(&mut self, record: &BudgetRecord) {
        match record {
            BudgetRecord::Config { seq, budget, .. } => {
                self.budget = Some(budget.clone());
                self.config_seq = Some(*seq);
                self.calendar = CalendarCache(budget.calendar().ok());
                self.quota_used.retain(|key, _| budget.quotas.contains_key(key));
            }
            BudgetRecord::Budget { decision, .. } => {
                let key = (decision.level, decision.scope.clone());
                if decision.status == Status::Restored {
                    self.announced.retain(|(l, s, _)| (*l, s.clone()) != key);
                } else {
                    self.announced.insert((key.0, key.1, decision.status));
                }
            }
            BudgetRecord::Admission { seq, admission: a } => {
                if let (true, Some(id), Some(expires_at)) = (a.allowed, &a.reservation_id, a.expires_at) {
                    let limits = |unit| self.budget.as_ref().is_some_and(|b| b.limits_unit(unit));
                    let r = Reservation {
                        task_id: a.task_id.clone(),
                        amount: a.estimate_micros,
                        expires_at,
                        day: a.day,
                        period: a.period,
                        more_days: a.more_days.clone(),
                        more_periods: a.more_periods.clone(),
                        held_tokens: limits(Unit::Tokens).then(|| a.estimated_tokens.unwrap_or(0)),
                        held_call: limits(Unit::Calls),
                    };
                    self.remove_reservation(id);
                    self.account(id, &r, 1);
                    self.reservations.insert(id.clone(), r);
                }
                if a.allowed {
                    self.count_against_quotas(a);
                }
                if let Some(idem) = &a.idempotency {
                    let answer = Admission { idempotency: None, token: None, ..a.clone() };
                    self.remember(idem, *seq, a.at, Some(answer));
                }
            }
            BudgetRecord::Release { seq, release } => {
                self.remove_reservation(&release.reservation_id);
                if let Some(idem) = &release.idempotency {
                    self.remember(idem, *seq, release.at, None);
                }
            }
            BudgetRecord::Freeze { freeze, .. } => {
                self.freezes.insert(freeze.freeze_id.clone(), freeze.clone());
                self.ever_frozen = true;
            }
            BudgetRecord::Unfreeze { unfreeze, .. } => {
                self.freezes.remove(&unfreeze.freeze_id);
            }
            BudgetRecord::Flag { .. } | BudgetRecord::Erasure { .. } => {}
            BudgetRecord::Statement { seq, statement } => {
                self.open_periods.remove(&statement.period);
                self.closed_through = self.closed_through.max(Some(statement.period));
                self.statements.insert(statement.period, *seq);
                while self.statements.len() > MAX_LISTED_STATEMENTS {
                    self.statements.pop_first();
                }
            }
        }
    }

    /// Keeps a keyed request's answer, forgetting keys older than `REMEMBER_KEYS_FOR` before `at`
    /// and the oldest beyond `MAX_REMEMBERED_KEYS`. A key already remembered keeps its first
    /// answer (the ledger never records a key twice; a log that did is answered by its first).
    fn remember(&mut self, idem: &Idempotency, seq: u64, at: Timestamp, admission: Option<Admission>) {
        let horizon = at.checked_sub(REMEMBER_KEYS_FOR).unwrap_or(at);
        while let Some((_, key)) = self.remembered_order.first_key_value() {
            let young = self.remembered.get(key).is_some_and(|r| r.at >= horizon);
            if young && self.remembered.len() < MAX_REMEMBERED_KEYS {
                break;
            }
            if let Some((_, key)) = self.remembered_order.pop_first() {
                self.remembered.remove(&key);
            }
        }
        // A key still held past the horizon (out of order record times kept it behind a younger
        // key) is a new request now, as `recall` sees it: its new answer replaces the old.
        if let Some(stale) = self.remembered.get(&idem.key).filter(|r| r.at < horizon).map(|r| r.seq) {
            self.remembered_order.remove(&stale);
            self.remembered.remove(&idem.key);
        }
        if !self.remembered.contains_key(&idem.key) {
            self.remembered_order.insert(seq, idem.key.clone());
            self.remembered.insert(idem.key.clone(), Remembered { request_sha256: idem.request_sha256.clone(), seq, at, admission });
        }
    }

    /// What an admission uses of a quota: 1 call, its estimated tokens, or nothing if the quota
    /// does not select it.
    fn quota_cost(key: &str, kind: Option<&str>, action: Option<&str>, tokens: Option<u64>) -> u64 {
        match QuotaSelector::parse(key) {
            Ok(QuotaSelector::Calls) => 1,
            Ok(QuotaSelector::Tokens) => tokens.unwrap_or(0),
            Ok(QuotaSelector::Action(name)) => u64::from(action == Some(name)),
            Ok(QuotaSelector::Kind(name)) => u64::from(kind == Some(name)),
            Err(_) => 0,
        }
    }

    /// The start of the fixed window of `window_secs` holding `at` (aligned to the Unix epoch).
    fn window_start(at: Timestamp, window_secs: u64) -> Timestamp {
        let secs = at.as_second();
        let w = i64::try_from(window_secs).unwrap_or(i64::MAX).max(1);
        Timestamp::from_second(secs.div_euclid(w) * w).unwrap_or(at)
    }

    /// An allowed admission's use of each quota, in its `at`'s window: counted from the log, so
    /// a replay counts the same.
    fn count_against_quotas(&mut self, a: &Admission) {
        let Some(budget) = &self.budget else { return };
        for (key, quota) in &budget.quotas {
            let cost = Self::quota_cost(key, a.kind.as_deref(), a.action.as_deref(), a.estimated_tokens);
            if cost == 0 {
                continue;
            }
            let start = Self::window_start(a.at, quota.window_secs);
            let used = self.quota_used.entry(key.clone()).or_insert((start, 0));
            // A later window starts empty; an earlier one (a clock stepped back, an owner with a
            // slower clock) is over: the call counts in the current window instead, never
            // wiping it.
            if start > used.0 {
                *used = (start, 0);
            }
            used.1 = used.1.saturating_add(cost);
        }
    }

    /// What quota `key` used in the window starting at `start`: the recorded window's count if
    /// it is that window or a later one (a clock behind the records), else nothing.
    fn used_in(&self, key: &str, start: Timestamp) -> u64 {
        self.quota_used.get(key).filter(|(s, _)| *s >= start).map_or(0, |(_, n)| *n)
    }

    /// The first quota (by key) that `request` at `now` would take past its limit: its key and
    /// the milliseconds until its window ends; `Err(key)` for a request that costs more than the
    /// quota's whole window allows (no retry would help).
    pub fn throttle(&self, now: Timestamp, request: &AuthorizeRequest) -> Option<Result<(String, u64), String>> {
        let budget = self.budget.as_ref()?;
        for (key, quota) in &budget.quotas {
            let cost = Self::quota_cost(key, request.kind.as_deref(), request.action.as_deref(), request.estimated_tokens);
            if cost == 0 {
                continue;
            }
            if cost > quota.limit {
                return Some(Err(key.clone()));
            }
            let start = Self::window_start(now, quota.window_secs);
            let used = self.used_in(key, start);
            if used.saturating_add(cost) > quota.limit {
                let end = start + jiff::SignedDuration::from_secs(i64::try_from(quota.window_secs).unwrap_or(i64::MAX));
                let wait = end.duration_since(now).as_millis().max(1);
                return Some(Ok((key.clone(), u64::try_from(wait).unwrap_or(u64::MAX))));
            }
        }
        None
    }

    /// Each quota's use in the window holding `now`: (key, used, limit, window end).
    pub fn quota_levels(&self, now: Timestamp) -> Vec<(String, u64, u64, Timestamp)> {
        let Some(budget) = &self.budget else { return Vec::new() };
        budget
            .quotas
            .iter()
            .map(|(key, quota)| {
                let start = Self::window_start(now, quota.window_secs);
                let used = self.used_in(key, start);
                (key.clone(), used, quota.limit, start + jiff::SignedDuration::from_secs(i64::try_from(quota.window_secs).unwrap_or(i64::MAX)))
            })
            .collect()
    }

    /// The oldest active freeze covering a request or event with these values.
    pub fn freeze_covering(&self, agent_id: Option<&str>, action: Option<&str>, task_id: Option<&str>) -> Option<&Freeze> {
        self.freezes.values().filter(|f| f.scope.covers(agent_id, action, task_id)).min_by_key(|f| f.at)
    }

    /// Active freezes, by id.
    pub fn freezes(&self) -> impl Iterator<Item = &Freeze> {
        self.freezes.values()
    }

    pub fn ever_frozen(&self) -> bool {
        self.ever_frozen
    }

    pub fn has_freeze(&self, freeze_id: &str) -> bool {
        self.freezes.contains_key(freeze_id)
    }

    /// The answer a keyed request was given, if its key is still remembered.
    pub fn remembered(&self, key: &str) -> Option<&Remembered> {
        self.remembered.get(key)
    }

    /// The calendar billing periods follow: the budget's, else UTC months.
    pub fn billing_calendar(&self) -> Calendar {
        self.calendar().unwrap_or_else(Calendar::utc_months)
    }

    /// What `event` is charged if the ledger appends it now: rated under the tenant's catalog
    /// in its billing calendar. An event of a period already closed by a statement (or of an
    /// earlier one) is billed in the first open period instead, as a correction of its own.
    /// The ledger writes this into the record.
    pub fn rate(&self, event: &Event) -> Option<Charge> {
        let catalog = self.budget.as_ref().zip(self.config_seq).map(|(budget, config_seq)| Catalog { budget, config_seq });
        rate(event, catalog, &self.billing_calendar(), self.closed_through)
    }

    /// Whether a charge billed in `period` (a charge's `period`) would open a period that has
    /// no charges yet: only then can the tenant's next close move.
    pub fn opens_period(&self, period: &str) -> bool {
        period.parse::<Date>().is_ok_and(|p| !self.open_periods.contains_key(&p))
    }

    /// When `period` closes under `calendar` and `grace`: its start, its end and its close.
    /// `None` for a period at the end of time (an event dated 9999-12), which never closes.
    fn close_bounds(calendar: &Calendar, period: Date, grace: jiff::SignedDuration) -> Option<(Timestamp, Timestamp, Timestamp)> {
        let next = Some(calendar.next_period(period)).filter(|next| *next != Date::MAX)?;
        let (start, end) = (calendar.start_of(period), calendar.start_of(next));
        if start >= end {
            return None;
        }
        Some((start, end, end.checked_add(grace).ok()?))
    }

    /// The statements due at `now`: every open period whose end plus `grace` has passed, oldest
    /// first, each with its `at` (end + grace) and without its `tree_size` (the seq the caller
    /// appends it at).
    pub fn statements_due(&self, now: Timestamp, grace: jiff::SignedDuration) -> Vec<Statement> {
        let calendar = self.billing_calendar();
        let zone = self.budget.as_ref().map_or("UTC", |b| b.time_zone.as_str()).to_string();
        self.open_periods
            .iter()
            .filter_map(|(period, open)| {
                let (start, end, at) = Self::close_bounds(&calendar, *period, grace)?;
                (at <= now).then(|| Statement {
                    at,
                    period: *period,
                    period_start: start,
                    period_end: end,
                    time_zone: zone.clone(),
                    first_seq: open.first_seq,
                    last_seq: open.last_seq,
                    tree_size: 0,
                    totals: open.totals.clone(),
                })
            })
            .collect()
    }

    /// When the earliest open period closes (its end plus `grace`).
    pub fn next_close(&self, grace: jiff::SignedDuration) -> Option<Timestamp> {
        let period = self.open_periods.keys().next()?;
        Self::close_bounds(&self.billing_calendar(), *period, grace).map(|(_, _, at)| at)
    }

    /// Counts an `event` or `conflict` record's [`tally_log::input_time`] (the fold does it
    /// itself; the partition when it appends one).
    pub fn observe_input(&mut self, at: Timestamp) {
        self.input_time = self.input_time.max(Some(at));
    }

    /// The latest input time of the tenant's records (see [`Self::observe_input`]).
    pub fn input_time(&self) -> Option<Timestamp> {
        self.input_time
    }

    /// The statements still listed, by period: (period, seq).
    pub fn statements(&self) -> impl Iterator<Item = (Date, u64)> + '_ {
        self.statements.iter().map(|(p, s)| (*p, *s))
    }

    /// Counts the event record at `seq` and its recorded `charge`: in the open period it is
    /// billed in (for the statement), and against the budget in its own day and period (and
    /// task); settles its reservation. A charge in another currency than the budget's is never
    /// added to its limits: nothing converts currencies (counted in `foreign_currency_events`).
    pub fn apply_event(&mut self, seq: u64, event: &Event, charge: Option<&Charge>) -> Vec<BudgetDecision> {
        if let Some(charge) = charge {
            // A record naming a period that is not a date cannot be billed; the ledger never
            // writes one, and the fold must not stop on it.
            if let Ok(period) = charge.period.parse::<Date>() {
                self.open_periods.entry(period).or_default().add(seq, charge, event.usage.as_ref());
            }
        }
        self.count_event(event, charge)
    }

    /// [`Self::apply_event`] without the statement: the budget's side only.
    fn count_event(&mut self, event: &Event, charge: Option<&Charge>) -> Vec<BudgetDecision> {
        if let Some(id) = &event.reservation_id {
            self.remove_reservation(id);
        }
        let (Some(budget), Some(calendar)) = (self.budget.clone(), self.calendar()) else { return Vec::new() };
        let micros = match charge {
            Some(c) if c.currency != budget.currency => {
                self.foreign_currency_events += 1;
                0
            }
            Some(c) => {
                if c.basis == ChargeBasis::Ceiling {
                    self.ceiling_priced += 1;
                }
                c.micros
            }
            None => 0,
        };
        let at = event.occurred_at;
        // The period the charge is billed in: its own, or for a late event the open period its
        // correction lands in, so budgets and statements count the same charge in one place.
        let period = charge.and_then(|c| c.period.parse::<Date>().ok()).unwrap_or_else(|| calendar.period(at));
        let day = calendar.day(at);
        // Saturating: a hostile or broken amount near i64::MAX must pin spend at "exhausted",
        // never wrap it negative.
        for spent in [self.spent_day.entry(day).or_default(), self.spent_period.entry(period).or_default()] {
            *spent = spent.saturating_add(micros);
        }
        let tokens = event.usage.as_ref().map_or(0, |u| u.input_tokens.saturating_add(u.output_tokens));
        for (unit, amount) in [(Unit::Tokens, tokens), (Unit::Calls, 1)] {
            if !budget.limits_unit(unit) || amount == 0 {
                continue;
            }
            let scopes = [(Level::Task, event.task_id.clone()), (Level::Day, Some(day.to_string())), (Level::Period, Some(period.to_string()))];
            for (level, scope) in scopes {
                if let Some(scope) = scope {
                    let e = self.unit_spent.entry(unit_key(unit, level, &scope)).or_default();
                    *e = e.saturating_add(amount);
                }
            }
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
            for unit in [Unit::Tokens, Unit::Calls] {
                self.unit_spent.remove(&unit_key(unit, Level::Task, t));
            }
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

    /// The task a held reservation is for.
    pub fn reservation_task(&self, id: &str) -> Option<&str> {
        self.reservations.get(id).and_then(|r| r.task_id.as_deref())
    }

    pub fn has_reservation(&self, id: &str) -> bool {
        self.reservations.contains_key(id)
    }

    /// When the earliest held reservation expires (on the wall clock: reservations come from
    /// admissions, which are API calls).
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// When the earliest window with an announcement ends (its `restored` record is due; the
    /// ledger goes by its input clock for those, see `PartitionLedger::settle_input`).
    pub fn next_window_end(&self) -> Option<Timestamp> {
        if self.announced.is_empty() {
            return None;
        }
        let calendar = self.calendar()?;
        self.announced
            .iter()
            .filter_map(|(level, scope, _)| {
                let d = scope.parse::<Date>().ok()?;
                match level {
                    Level::Day => Some(calendar.start_of(d.tomorrow().ok()?)),
                    Level::Period => Some(calendar.start_of(calendar.next_period(d))),
                    Level::Task => None,
                }
            })
            .min()
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
                tokens: self.unit_state(Unit::Tokens, level, &scope),
                calls: self.unit_state(Unit::Calls, level, &scope),
                scope,
            });
        }
        out
    }

    /// The scopes of `level` a hold from `now` until `until` reaches: the task (if any), or the
    /// current day or period and every later one the span reaches ("Window edges").
    fn spanned_scopes(&self, level: Level, now: Timestamp, until: Timestamp, task_id: Option<&str>) -> Vec<String> {
        let calendar = match (level, self.calendar()) {
            (Level::Task, _) => return task_id.map(str::to_string).into_iter().collect(),
            (_, Some(c)) => c,
            (_, None) => return Vec::new(),
        };
        let (first, later) = match level {
            Level::Day => (calendar.day(now), calendar.later_days(now, until)),
            _ => (calendar.period(now), calendar.later_periods(now, until)),
        };
        std::iter::once(first).chain(later).map(|d| d.to_string()).collect()
    }

    /// Would `estimate`, held from `now` until `until`, fit at every level? Each day and period
    /// that `[now, until]` reaches is checked, not only the current ones, since the reservation's
    /// event may be charged to any of them. The most specific level that says no denies.
    pub fn authorize(&self, now: Timestamp, until: Timestamp, task_id: Option<&str>, estimate: i64) -> Verdict {
        let levels = self.levels(now, task_id);
        let over = |limit: i64, spent: i64, reserved: i64| i128::from(spent) + i128::from(reserved) + i128::from(estimate) > i128::from(limit);
        let denied_by = levels
            .iter()
            .find(|l| {
                let Some(limit) = l.limit_micros else { return false };
                self.spanned_scopes(l.level, now, until, task_id).iter().any(|scope| over(limit, self.spent(l.level, scope), self.reserved(l.level, scope)))
            })
            .map(|l| l.level);
        Verdict { allowed: denied_by.is_none(), denied_by: denied_by.map(DeniedBy::from), throttled: None, levels }
    }

    fn unit_used(&self, unit: Unit, level: Level, scope: &str) -> (u64, u64) {
        let key = unit_key(unit, level, scope);
        (self.unit_spent.get(&key).copied().unwrap_or(0), self.unit_reserved.get(&key).copied().unwrap_or(0))
    }

    fn unit_state(&self, unit: Unit, level: Level, scope: &str) -> Option<UnitState> {
        let limit = self.budget.as_ref()?.unit_limit(unit, level)?;
        let (spent, reserved) = self.unit_used(unit, level, scope);
        Some(UnitState { limit, spent, reserved, remaining: limit.saturating_sub(spent.saturating_add(reserved)) })
    }

    /// The first token or call limit (task, then day, then period; tokens before calls) that a
    /// request for `tokens` held from `now` until `until` would pass, in any window its span
    /// reaches: the level and the unit that deny it.
    pub fn units_deny(&self, now: Timestamp, until: Timestamp, task_id: Option<&str>, tokens: u64) -> Option<(Level, Unit)> {
        let budget = self.budget.as_ref()?;
        for level in [Level::Task, Level::Day, Level::Period] {
            let scopes = self.spanned_scopes(level, now, until, task_id);
            for (unit, cost) in [(Unit::Tokens, tokens), (Unit::Calls, 1)] {
                let Some(limit) = budget.unit_limit(unit, level) else { continue };
                for scope in &scopes {
                    let (spent, reserved) = self.unit_used(unit, level, scope);
                    if u128::from(spent) + u128::from(reserved) + u128::from(cost) > u128::from(limit) {
                        return Some((level, unit));
                    }
                }
            }
        }
        None
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
