//! Rating: what an event costs, decided once when the ledger appends it and written into its
//! record as a [`Charge`] (docs/billing.md). Every reader sums the recorded charge, so budgets,
//! roll-ups, reports, spend and statements can never disagree about an event's price.
//!
//! Precedence: the gateway's own cost (`event`, in the event's currency); else the event's tokens
//! priced by its model (`action`) from the tenant's catalog (`table`); else at the catalog's
//! ceiling (`ceiling`); else nothing is charged (no cost, and no tokens or no catalog). Pure: the
//! same event and catalog always give the same charge, so a replay writes the same bytes.

use jiff::civil::Date;
use tally_log::{Charge, ChargeBasis};
use tally_schemas::Event;

use super::config::TenantBudget;
use super::window::Calendar;

/// The price catalog an event is rated under: the tenant's effective budget and the seq of the
/// `config` record that put it in force (the catalog version written into table charges).
#[derive(Debug, Clone, Copy)]
pub struct Catalog<'a> {
    pub budget: &'a TenantBudget,
    pub config_seq: u64,
}

/// The charge of `event` under `catalog` (none: no budget configured), billed in the period of
/// `calendar` it occurred in, unless a statement already closed that period (`closed_through`
/// is the latest closed one): then in the first open period, as a correction of its own.
/// `None` when there is nothing to charge.
pub fn rate(event: &Event, catalog: Option<Catalog<'_>>, calendar: &Calendar, closed_through: Option<Date>) -> Option<Charge> {
    let own = calendar.period(event.occurred_at);
    let (period, corrects) = match closed_through.filter(|closed| own <= *closed) {
        Some(closed) => (calendar.next_period(closed).to_string(), Some(own.to_string())),
        None => (own.to_string(), None),
    };
    if let Some(cost) = &event.cost {
        return Some(Charge { micros: cost.amount_micros, currency: cost.currency.clone(), basis: ChargeBasis::Event, catalog_seq: None, period, corrects });
    }
    let usage = event.usage.as_ref()?;
    let catalog = catalog?;
    let (price, basis) = match event.action.as_ref().and_then(|model| catalog.budget.prices.get(model)) {
        Some(price) => (price, ChargeBasis::Table),
        None => (catalog.budget.ceiling.as_ref()?, ChargeBasis::Ceiling),
    };
    Some(Charge {
        micros: price.charge(usage.input_tokens, usage.output_tokens),
        currency: catalog.budget.currency.clone(),
        basis,
        catalog_seq: Some(catalog.config_seq),
        period,
        corrects,
    })
}
