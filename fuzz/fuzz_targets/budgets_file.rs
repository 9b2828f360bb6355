//! Budgets files as the ledger loads them at start and on every change: parsed, then validated.
//! A file that validates resolves every tenant it lists (and one it does not), each budget's
//! calendar is valid, its canonical JSON (what a `config` record stores) reads back unchanged,
//! and no price charges a negative sum, whatever the token counts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_budget::{BudgetFile, TenantBudget};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = toml::from_str::<BudgetFile>(text) else { return };
    if file.validate().is_err() {
        return;
    }
    for tenant in file.tenants.keys().map(String::as_str).chain(["unlisted-tenant"]) {
        let budget = file.for_tenant(tenant).expect("a validated file resolves every tenant");
        budget.calendar().expect("a validated budget has a valid calendar");
        let json = serde_json::to_vec(&budget).expect("a budget serializes");
        let back: TenantBudget = serde_json::from_slice(&json).expect("a recorded budget reads back");
        assert_eq!(back, budget);
        for price in budget.prices.values().chain(budget.ceiling.iter()) {
            for tokens in [0, 1, tally_schemas::MAX_TOKENS, u64::MAX] {
                let charge = price.charge(tokens, tokens);
                assert!(charge >= 0, "{price:?} charges {charge} for {tokens} tokens");
                assert!(price.charge(tokens, tokens.saturating_add(1)) >= charge, "one more token never costs less");
            }
        }
    }
});
