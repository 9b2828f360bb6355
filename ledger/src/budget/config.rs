//! Budget configuration: plans with limits, calendar and prices, and per-tenant overrides (TOML).
//!
//! ```toml
//! default_plan = "standard"          # tenants not listed get it; without one, no limits
//! [plans.standard]
//! task_micros = 2_000_000             # each level optional
//! day_micros = 20_000_000
//! period_micros = 300_000_000
//! soft_threshold = 0.8                # a warning once per scope and window
//! time_zone = "UTC"                   # IANA; default UTC
//! period_anchor_day = 1               # 1..=31; default 1
//! currency = "USD"                    # default USD
//! ceiling = { input_per_million_micros = 15_000_000, output_per_million_micros = 60_000_000 }
//! [plans.standard.prices."gpt-5-mini"]
//! input_per_million_micros = 250_000
//! output_per_million_micros = 2_000_000
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
    pub fn charge(&self, input_tokens: u64, output_tokens: u64) -> i64 {
        let total =
            i128::from(input_tokens) * i128::from(self.input_per_million_micros) + i128::from(output_tokens) * i128::from(self.output_per_million_micros);
        i64::try_from((total + 999_999) / 1_000_000).unwrap_or(i64::MAX)
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
    pub soft_threshold: Option<f64>,
    pub time_zone: Option<String>,
    pub period_anchor_day: Option<u8>,
    pub currency: Option<String>,
    pub ceiling: Option<Price>,
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_threshold_bp: Option<u32>,
    pub time_zone: String,
    pub period_anchor_day: u8,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Price>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, Price>,
}

impl TenantBudget {
    pub fn has_limits(&self) -> bool {
        self.task_micros.is_some() || self.day_micros.is_some() || self.period_micros.is_some()
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
        soft_threshold_bp,
        time_zone: own.time_zone.clone().or_else(|| base.time_zone.clone()).unwrap_or_else(|| "UTC".into()),
        period_anchor_day: own.period_anchor_day.or(base.period_anchor_day).unwrap_or(1),
        currency: own.currency.clone().or_else(|| base.currency.clone()).unwrap_or_else(|| "USD".into()),
        ceiling: own.ceiling.or(base.ceiling),
        prices,
    };
    for (name, limit) in [("task_micros", budget.task_micros), ("day_micros", budget.day_micros), ("period_micros", budget.period_micros)] {
        if limit.is_some_and(|l| l <= 0) {
            return Err(Error::BadBudget(format!("{name} must be positive")));
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
        let err = toml::from_str::<BudgetFile>("[plans.a]\nday_limit = 5\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `day_limit`"), "{err}");
    }
}
