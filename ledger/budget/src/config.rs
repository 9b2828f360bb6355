//! Budget configuration: plans with limits, calendar and prices, and per-tenant overrides (TOML).
//!
//! ```toml
//! default_plan = "standard"          # tenants not listed get it; without one, no limits
//! [plans.standard]
//! task_micros = 2_000_000             # each level optional
//! day_micros = 20_000_000
//! period_micros = 300_000_000
//! soft_threshold = 0.8                # a warning once per scope and window
//! day_tokens = 2_000_000              # limits in tokens and calls too, at each level
//! task_calls = 50
//! time_zone = "UTC"                   # IANA; default UTC
//! period_anchor_day = 1               # 1..=31; default 1
//! currency = "USD"                    # default USD
//! ceiling = { input_per_million_micros = 15_000_000, output_per_million_micros = 60_000_000 }
//! [plans.standard.prices."gpt-5-mini"]
//! input_per_million_micros = 250_000
//! output_per_million_micros = 2_000_000
//! [plans.standard.quotas]             # rate quotas: at most N per fixed window
//! calls = "600/m"                     # every allowed call
//! tokens = "200000/m"                 # estimated tokens of allowed calls
//! "action:send_email" = "50/h"        # calls naming that action
//! "kind:tool_call" = "1000/d"         # calls naming that kind
//! [tenants.acme]
//! plan = "standard"
//! day_micros = 5_000_000
//! time_zone = "Europe/Berlin"
//! ```
//!
//! A tenant's effective [`TenantBudget`] is its plan with its own settings on top. It is what a
//! `config` record stores, so replaying a log never needs the file. Any limit requires a `ceiling`
//! price: an event whose model is not in the table is charged at the ceiling, never at $0.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::{Level, Unit};
use super::window::Calendar;
use crate::error::{Error, Result};

/// Micros per million tokens, for input and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_million_micros: i64,
    pub output_per_million_micros: i64,
}

impl Price {
    /// Rounded up to the micro: a fraction of a micro is still spend.
    /// Saturates at `i64::MAX`: checked, never wrapping, whatever the counts (events carry at
    /// most `MAX_TOKENS` of each, far below where it saturates).
    pub fn charge(&self, input_tokens: u64, output_tokens: u64) -> i64 {
        let part = |tokens: u64, price: i64| i128::from(tokens).checked_mul(i128::from(price));
        let total = part(input_tokens, self.input_per_million_micros)
            .zip(part(output_tokens, self.output_per_million_micros))
            .and_then(|(input, output)| input.checked_add(output)?.checked_add(999_999));
        total.map_or(i64::MAX, |total| i64::try_from(total / 1_000_000).unwrap_or(i64::MAX))
    }
}

/// Settings shared by plans and tenant overrides; every field optional. `plan` is for tenants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub plan: Option<String>,
    pub task_micros: Option<i64>,
    pub day_micros: Option<i64>,
    pub period_micros: Option<i64>,
    pub task_tokens: Option<u64>,
    pub day_tokens: Option<u64>,
    pub period_tokens: Option<u64>,
    pub task_calls: Option<u64>,
    pub day_calls: Option<u64>,
    pub period_calls: Option<u64>,
    pub soft_threshold: Option<f64>,
    pub time_zone: Option<String>,
    pub period_anchor_day: Option<u8>,
    pub currency: Option<String>,
    pub ceiling: Option<Price>,
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Rate quotas, `selector = "<n>/<s|m|h|d>"`; a tenant's entries replace its plan's.
    #[serde(default)]
    pub quotas: BTreeMap<String, String>,
    /// How many days personal values are kept (docs/privacy.md, "Retention"); none: until
    /// erased.
    pub personal_data_days: Option<u32>,
}

/// A rate quota: at most `limit` per fixed window of `window_secs`, windows aligned to the Unix
/// epoch (docs/budgets.md, "Rate quotas").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub limit: u64,
    pub window_secs: u64,
}

/// The longest retention of personal values: a hundred years.
const MAX_PERSONAL_DATA_DAYS: u32 = 36_525;

/// The most a quota may allow per window, and the units it may count per.
const MAX_QUOTA_LIMIT: u64 = 1_000_000_000_000;

impl Quota {
    /// `"50/h"`: a positive count and a window of one second, minute, hour or day.
    pub fn parse(text: &str) -> Result<Quota> {
        let bad = || Error::BadBudget(format!("quota {text:?} must be <count>/<s|m|h|d>, such as \"50/h\", with a count of 1..={MAX_QUOTA_LIMIT}"));
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let limit: u64 = n.trim().parse().map_err(|_| bad())?;
        let window_secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        if !(1..=MAX_QUOTA_LIMIT).contains(&limit) {
            return Err(bad());
        }
        Ok(Quota { limit, window_secs })
    }
}

/// What a quota counts, from its key: `calls`, `tokens`, `action:<name>`, `kind:<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSelector<'a> {
    /// Every allowed call.
    Calls,
    /// The estimated tokens of allowed calls.
    Tokens,
    /// Allowed calls naming this action.
    Action(&'a str),
    /// Allowed calls naming this kind.
    Kind(&'a str),
}

impl<'a> QuotaSelector<'a> {
    pub fn parse(key: &'a str) -> Result<Self> {
        let named = |prefix: &str| key.strip_prefix(prefix).filter(|n| !n.is_empty() && n.chars().count() <= 256 && !n.chars().any(char::is_control));
        match key {
            "calls" => Ok(QuotaSelector::Calls),
            "tokens" => Ok(QuotaSelector::Tokens),
            _ => named("action:")
                .map(QuotaSelector::Action)
                .or_else(|| named("kind:").map(QuotaSelector::Kind))
                .ok_or_else(|| Error::BadBudget(format!("quota key {key:?} must be calls, tokens, action:<name> or kind:<name>"))),
        }
    }
}

/// The budgets file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    pub default_plan: Option<String>,
    #[serde(default)]
    pub plans: BTreeMap<String, Settings>,
    #[serde(default)]
    pub tenants: BTreeMap<String, Settings>,
}

/// One tenant's effective budget, as recorded in `config` records. Integers only (the soft
/// threshold in basis points), so its canonical JSON is stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBudget {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_micros: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day_micros: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_micros: Option<i64>,
    /// Limits in tokens (input + output) and in calls (events), per level (docs/budgets.md,
    /// "Limits in tokens and calls").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_calls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_threshold_bp: Option<u32>,
    pub time_zone: String,
    pub period_anchor_day: u8,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Price>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, Price>,
    /// Rate quotas by selector key (validated: [`QuotaSelector::parse`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quotas: BTreeMap<String, Quota>,
    /// How many days personal values are kept before a retention pass erases them; none: until
    /// erased (docs/privacy.md, "Retention").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal_data_days: Option<u32>,
}

impl TenantBudget {
    /// Money limits (which need a ceiling price).
    pub fn has_limits(&self) -> bool {
        self.task_micros.is_some() || self.day_micros.is_some() || self.period_micros.is_some()
    }

    /// Anything to enforce: money, token or call limits, or rate quotas. A tenant with any gets
    /// a `config` record.
    pub fn enforces_anything(&self) -> bool {
        self.has_limits() || !self.quotas.is_empty() || [Unit::Tokens, Unit::Calls].iter().any(|u| self.limits_unit(*u))
    }

    /// Whether the tenant's log needs this budget as a `config` record: it enforces something,
    /// prices events (a catalog: charges name its record), or bills in a calendar of its own.
    /// A budget of defaults only is never recorded.
    pub fn needs_record(&self) -> bool {
        self.enforces_anything()
            || !self.prices.is_empty()
            || self.ceiling.is_some()
            || self.time_zone != "UTC"
            || self.period_anchor_day != 1
            || self.personal_data_days.is_some()
    }

    /// The limit in `unit` at `level`.
    pub fn unit_limit(&self, unit: Unit, level: Level) -> Option<u64> {
        match (unit, level) {
            (Unit::Tokens, Level::Task) => self.task_tokens,
            (Unit::Tokens, Level::Day) => self.day_tokens,
            (Unit::Tokens, Level::Period) => self.period_tokens,
            (Unit::Calls, Level::Task) => self.task_calls,
            (Unit::Calls, Level::Day) => self.day_calls,
            (Unit::Calls, Level::Period) => self.period_calls,
        }
    }

    /// Whether any level limits `unit` (only then is it counted).
    pub fn limits_unit(&self, unit: Unit) -> bool {
        [Level::Task, Level::Day, Level::Period].iter().any(|l| self.unit_limit(unit, *l).is_some())
    }

    pub fn calendar(&self) -> Result<Calendar> {
        Calendar::new(&self.time_zone, self.period_anchor_day)
    }
}

impl BudgetFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file: BudgetFile = toml::from_str(&text).map_err(|e| Error::BadBudget(format!("{}: {e}", path.display())))?;
        file.validate().map_err(|e| match e {
            Error::BadBudget(m) => Error::BadBudget(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(file)
    }

    /// Resolves every plan and listed tenant, so a bad value is reported at load, naming it.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.default_plan {
            if !self.plans.contains_key(p) {
                return Err(Error::BadBudget(format!("default_plan {p:?} is not defined under [plans]")));
            }
        }
        for (name, plan) in &self.plans {
            if plan.plan.is_some() {
                return Err(Error::BadBudget(format!("plans.{name}.plan: a plan cannot name another plan")));
            }
            resolve(Some(name), plan, &Settings::default()).map_err(|e| prefix(&format!("plans.{name}"), e))?;
        }
        for (tenant, t) in &self.tenants {
            tally_schemas::validate_tenant_id(tenant).map_err(|_| Error::BadBudget(format!("tenants.{tenant}: not a valid tenant id")))?;
            if let Some(p) = &t.plan {
                if !self.plans.contains_key(p) {
                    return Err(Error::BadBudget(format!("tenants.{tenant}.plan: {p:?} is not defined under [plans]")));
                }
            }
            self.for_tenant(tenant).map_err(|e| prefix(&format!("tenants.{tenant}"), e))?;
        }
        Ok(())
    }

    /// The tenant's effective budget.
    pub fn for_tenant(&self, tenant: &str) -> Result<TenantBudget> {
        let own = self.tenants.get(tenant);
        let plan_name = own.and_then(|t| t.plan.clone()).or_else(|| self.default_plan.clone());
        let plan = plan_name.as_ref().and_then(|p| self.plans.get(p)).cloned().unwrap_or_default();
        let empty = Settings::default();
        resolve(plan_name.as_deref(), &plan, own.unwrap_or(&empty))
    }
}

fn prefix(at: &str, e: Error) -> Error {
    match e {
        Error::BadBudget(m) => Error::BadBudget(format!("{at}: {m}")),
        other => other,
    }
}

fn resolve(plan: Option<&str>, base: &Settings, own: &Settings) -> Result<TenantBudget> {
    let mut prices = base.prices.clone();
    prices.extend(own.prices.clone());
    let mut quotas = BTreeMap::new();
    for (key, text) in base.quotas.iter().chain(own.quotas.iter()) {
        QuotaSelector::parse(key)?;
        quotas.insert(key.clone(), Quota::parse(text).map_err(|e| prefix(&format!("quotas.{key:?}"), e))?);
    }
    let soft = own.soft_threshold.or(base.soft_threshold);
    let soft_threshold_bp = match soft {
        None => None,
        Some(s) if s > 0.0 && s < 1.0 => Some((s * 10_000.0).round() as u32),
        Some(s) => return Err(Error::BadBudget(format!("soft_threshold = {s} must be between 0 and 1 (exclusive)"))),
    };
    let budget = TenantBudget {
        plan: plan.map(str::to_string),
        task_micros: own.task_micros.or(base.task_micros),
        day_micros: own.day_micros.or(base.day_micros),
        period_micros: own.period_micros.or(base.period_micros),
        task_tokens: own.task_tokens.or(base.task_tokens),
        day_tokens: own.day_tokens.or(base.day_tokens),
        period_tokens: own.period_tokens.or(base.period_tokens),
        task_calls: own.task_calls.or(base.task_calls),
        day_calls: own.day_calls.or(base.day_calls),
        period_calls: own.period_calls.or(base.period_calls),
        soft_threshold_bp,
        time_zone: own.time_zone.clone().or_else(|| base.time_zone.clone()).unwrap_or_else(|| "UTC".into()),
        period_anchor_day: own.period_anchor_day.or(base.period_anchor_day).unwrap_or(1),
        currency: own.currency.clone().or_else(|| base.currency.clone()).unwrap_or_else(|| "USD".into()),
        ceiling: own.ceiling.or(base.ceiling),
        prices,
        quotas,
        personal_data_days: own.personal_data_days.or(base.personal_data_days),
    };
    if budget.personal_data_days.is_some_and(|d| !(1..=MAX_PERSONAL_DATA_DAYS).contains(&d)) {
        return Err(Error::BadBudget(format!("personal_data_days must be 1..={MAX_PERSONAL_DATA_DAYS}")));
    }
    for (name, limit) in [("task_micros", budget.task_micros), ("day_micros", budget.day_micros), ("period_micros", budget.period_micros)] {
        if limit.is_some_and(|l| l <= 0) {
            return Err(Error::BadBudget(format!("{name} must be positive")));
        }
    }
    for unit in [Unit::Tokens, Unit::Calls] {
        for level in [Level::Task, Level::Day, Level::Period] {
            if budget.unit_limit(unit, level) == Some(0) {
                return Err(Error::BadBudget(format!("{}_{} must be positive", level.as_str(), unit.as_str())));
            }
        }
    }
    for (model, p) in budget.prices.iter().map(|(m, p)| (m.as_str(), p)).chain(budget.ceiling.iter().map(|p| ("ceiling", p))) {
        if p.input_per_million_micros < 0 || p.output_per_million_micros < 0 {
            return Err(Error::BadBudget(format!("price of {model:?} must not be negative")));
        }
    }
    if budget.has_limits() && budget.ceiling.is_none() {
        return Err(Error::BadBudget("a budget with limits needs a ceiling price for models missing from its price table".into()));
    }
    if budget.currency.len() != 3 || !budget.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Error::BadBudget(format!("currency {:?} must be three upper-case letters", budget.currency)));
    }
    budget.calendar()?;
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_rounds_up_and_saturates_instead_of_wrapping() {
        let p = Price { input_per_million_micros: 250_000, output_per_million_micros: 2_000_000 };
        assert_eq!(p.charge(1, 0), 1, "a fraction of a micro is still spend");
        assert_eq!(p.charge(1_000_000, 1_000_000), 2_250_000);
        let most = Price { input_per_million_micros: i64::MAX, output_per_million_micros: i64::MAX };
        assert_eq!(most.charge(u64::MAX, u64::MAX), i64::MAX, "two near-2^127 products overflow i128: saturated, not wrapped");
        assert_eq!(most.charge(0, 0), 0);
    }

    const FILE: &str = r#"
default_plan = "standard"
[plans.standard]
day_micros = 20_000_000
period_micros = 300_000_000
soft_threshold = 0.8
ceiling = { input_per_million_micros = 15_000_000, output_per_million_micros = 60_000_000 }
[plans.standard.prices."gpt-5-mini"]
input_per_million_micros = 250_000
output_per_million_micros = 2_000_000
[tenants.acme]
day_micros = 5_000_000
time_zone = "Europe/Berlin"
period_anchor_day = 31
"#;

    #[test]
    fn tenants_inherit_their_plan_and_override_it() {
        let file: BudgetFile = toml::from_str(FILE).unwrap();
        file.validate().unwrap();
        let acme = file.for_tenant("acme").unwrap();
        assert_eq!((acme.day_micros, acme.period_micros, acme.task_micros), (Some(5_000_000), Some(300_000_000), None));
        assert_eq!((acme.time_zone.as_str(), acme.period_anchor_day, acme.soft_threshold_bp), ("Europe/Berlin", 31, Some(8_000)));
        let other = file.for_tenant("globex").unwrap();
        assert_eq!((other.day_micros, other.time_zone.as_str()), (Some(20_000_000), "UTC"));
        assert_eq!(other.prices["gpt-5-mini"].charge(1_000_000, 500_000), 250_000 + 1_000_000);
    }

    #[test]
    fn quotas_merge_plan_then_tenant_and_parse() {
        let file: BudgetFile = toml::from_str(
            "[plans.p.quotas]\ncalls = \"600/m\"\n\"action:send_email\" = \"50/h\"\n[tenants.acme]\nplan = \"p\"\n[tenants.acme.quotas]\ncalls = \"10/s\"\ntokens = \"1000/d\"\n",
        )
        .unwrap();
        file.validate().unwrap();
        let acme = file.for_tenant("acme").unwrap();
        let q = |k: &str| acme.quotas.get(k).map(|q| (q.limit, q.window_secs));
        assert_eq!((q("calls"), q("tokens"), q("action:send_email")), (Some((10, 1)), Some((1000, 86_400)), Some((50, 3_600))));
        assert!(acme.enforces_anything() && !acme.has_limits(), "quotas need no ceiling price");
        let file: BudgetFile = toml::from_str("[plans.p]\nday_tokens = 1000\ntask_calls = 3\n[tenants.acme]\nplan = \"p\"\nday_tokens = 500\n").unwrap();
        file.validate().unwrap();
        let acme = file.for_tenant("acme").unwrap();
        assert_eq!((acme.unit_limit(Unit::Tokens, Level::Day), acme.unit_limit(Unit::Calls, Level::Task)), (Some(500), Some(3)));
        assert!(acme.enforces_anything() && acme.limits_unit(Unit::Calls) && acme.limits_unit(Unit::Tokens) && !acme.has_limits());
        let err = toml::from_str::<BudgetFile>("[plans.a]\nday_calls = 0\n").unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("plans.a: day_calls must be positive"), "{err}");
        assert_eq!(QuotaSelector::parse("kind:tool_call").unwrap(), QuotaSelector::Kind("tool_call"));
    }

    #[test]
    fn prices_round_up_to_the_micro() {
        let p = Price { input_per_million_micros: 250_000, output_per_million_micros: 2_000_000 };
        assert_eq!(p.charge(1, 0), 1, "a quarter micro is still charged");
        assert_eq!(p.charge(4, 0), 1);
        assert_eq!(p.charge(5, 0), 2);
        assert_eq!(p.charge(0, 0), 0);
    }

    #[test]
    fn bad_values_are_named() {
        for (text, expect) in [
            ("default_plan = \"gold\"\n", "default_plan \"gold\" is not defined"),
            ("[plans.a]\nday_micros = 5\n", "plans.a: a budget with limits needs a ceiling"),
            ("[plans.a]\nsoft_threshold = 1.5\n", "plans.a: soft_threshold = 1.5"),
            ("[plans.a]\ntime_zone = \"Mars/Base\"\n", "plans.a: time_zone \"Mars/Base\""),
            ("[plans.a]\nperiod_anchor_day = 0\n", "plans.a: period_anchor_day = 0"),
            ("[tenants.acme]\nplan = \"gold\"\n", "tenants.acme.plan: \"gold\""),
            (
                "[tenants.acme]\nday_micros = -1\nceiling = { input_per_million_micros = 1, output_per_million_micros = 1 }\n",
                "tenants.acme: day_micros must be positive",
            ),
            ("[tenants.\"Bad Id\"]\n", "tenants.Bad Id: not a valid tenant id"),
        ] {
            let err = match toml::from_str::<BudgetFile>(text) {
                Ok(f) => f.validate().unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(expect), "{text}\n=> {err}");
        }
        for (text, expect) in [
            ("[plans.a.quotas]\ncalls = \"50\"\n", "plans.a: quotas.\"calls\": quota \"50\" must be <count>/<s|m|h|d>"),
            ("[plans.a.quotas]\ncalls = \"0/h\"\n", "quota \"0/h\" must be"),
            ("[plans.a.quotas]\ncalls = \"5/w\"\n", "quota \"5/w\" must be"),
            ("[plans.a.quotas]\nrequests = \"5/h\"\n", "plans.a: quota key \"requests\" must be calls, tokens"),
            ("[plans.a.quotas]\n\"action:\" = \"5/h\"\n", "quota key \"action:\""),
        ] {
            let err = toml::from_str::<BudgetFile>(text).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(expect), "{text}\n=> {err}");
        }
        let err = toml::from_str::<BudgetFile>("[plans.a]\nday_limit = 5\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `day_limit`"), "{err}");
    }
}
