//! The v1 Tally event and its validator.
//!
//! Validation is hand-written over `serde_json::Value` rather than derived, so that every failure
//! maps to a stable [`RejectCode`] and a detail naming the field. Unknown fields are rejected:
//! accepting them would drop data silently. `schemas/event-v1.schema.json` states the same rules
//! for other languages; a test checks the two agree on every file in `schemas/examples/`.
//!
//! Invariants of a constructed [`Event`]: the tenant id matches the documented pattern (docs/events.md), money is integer
//! micros ≥ 0, `occurred_at` is an instant (normalised to UTC when serialised), identifiers are
//! non-empty, at most [`MAX_ID_CHARS`] characters and free of control characters.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{RejectCode, Rejection};

/// Longest identifier (event id, agent id, task id, …), in characters.
pub const MAX_ID_CHARS: usize = 256;

/// Largest `cost.amount_micros` one event may carry: one million currency units. No single agent
/// action costs more; a larger figure is a gateway bug. The bound keeps sums far from the 64-bit
/// range (9.2 million maximal events before one sum could overflow), and every sum over amounts
/// is still checked.
pub const MAX_AMOUNT_MICROS: i64 = 1_000_000_000_000;

/// Largest token count (`usage.input_tokens`, `usage.output_tokens`) one event may carry.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// Most entries in `attributes`.
pub const MAX_ATTRIBUTES: usize = 64;

/// One enforcement decision, tool call or model call, attributed to one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub event_id: String,
    pub tenant_id: String,
    pub occurred_at: Timestamp,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Agent ids, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegation: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    ApprovalRequired,
    Throttled,
    BudgetExceeded,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::ApprovalRequired => "approval_required",
            Decision::Throttled => "throttled",
            Decision::BudgetExceeded => "budget_exceeded",
        }
    }

    fn parse(s: &str) -> Option<Decision> {
        [Decision::Allow, Decision::Deny, Decision::ApprovalRequired, Decision::Throttled, Decision::BudgetExceeded].into_iter().find(|d| d.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

/// Money: integer micros (1 USD = 1,000,000) and an ISO 4217 currency. Never a float.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    pub amount_micros: i64,
    pub currency: String,
}

/// Micros as a decimal string of currency units (`1234567` → `"1.234567"`): how money leaves
/// Tally in reports, exports and tools, never as a float.
pub fn decimal_units(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// Checks a tenant id against `^[a-z0-9][a-z0-9_-]{0,62}$`.
/// How far an event's time may run ahead: of its Kafka message's timestamp (`occurred_at`), and of
/// the ledger's clock (the message's timestamp). The clock skew tolerated between gateways,
/// producers and the ledger.
pub const MAX_CLOCK_AHEAD_SECONDS: i64 = 3_600;

/// Refuses an event whose time is a broken clock's, which the ledger would otherwise use to open
/// billing periods and budget windows in the future, and to move the clock its periods close on
/// (docs/billing.md):
/// - `occurred_after_publish`: it says it occurred more than [`MAX_CLOCK_AHEAD_SECONDS`] after its
///   message was published (`published_ms`, the Kafka timestamp). A function of the message
///   alone: a replay refuses the same events.
/// - `timestamp_in_future`: its message's timestamp (else its `occurred_at`) is more than
///   [`MAX_CLOCK_AHEAD_SECONDS`] ahead of `now`, the reader's clock. The one check on the wall
///   clock: a replay long after may accept such a message.
pub fn check_event_time(event: &Event, published_ms: Option<i64>, now: jiff::Timestamp) -> Result<(), Rejection> {
    let published = published_ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok());
    if let Some(published) = published {
        let ahead = event.occurred_at.duration_since(published).as_secs();
        if ahead > MAX_CLOCK_AHEAD_SECONDS {
            return Err(Rejection::new(
                RejectCode::OccurredAfterPublish,
                format!(
                    "occurred_at {} is {ahead} s after the message was published ({published}); at most {MAX_CLOCK_AHEAD_SECONDS} s of clock skew is accepted",
                    event.occurred_at
                ),
            ));
        }
    }
    let stamped = published.unwrap_or(event.occurred_at);
    let ahead = stamped.duration_since(now).as_secs();
    if ahead > MAX_CLOCK_AHEAD_SECONDS {
        let what = if published.is_some() { "the message's timestamp" } else { "occurred_at (the message has no timestamp)" };
        return Err(Rejection::new(
            RejectCode::TimestampInFuture,
            format!("{what} {stamped} is {ahead} s ahead of the ledger's clock ({now}); at most {MAX_CLOCK_AHEAD_SECONDS} s of clock skew is accepted"),
        ));
    }
    Ok(())
}

pub fn validate_tenant_id(tenant_id: &str) -> Result<(), Rejection> {
    let bytes = tenant_id.as_bytes();
    let first_ok = bytes.first().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if first_ok && rest_ok && bytes.len() <= 63 {
        Ok(())
    } else {
        Err(Rejection::new(RejectCode::BadTenantId, format!("tenant_id {:?} does not match ^[a-z0-9][a-z0-9_-]{{0,62}}$", truncate(tenant_id))))
    }
}

impl Event {
    /// Parses and validates one event from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Event, Rejection> {
        Event::from_value(crate::json::parse(bytes, "value")?)
    }

    /// Validates an already-parsed JSON value (e.g. the `data` of a CloudEvent).
    pub fn from_value(value: Value) -> Result<Event, Rejection> {
        let Value::Object(map) = value else {
            return Err(Rejection::new(RejectCode::NotAnObject, format!("event must be a JSON object, found {}", type_name(&value))));
        };
        let mut fields = Fields { map, path: "" };
        let event_id = fields.required_id("event_id")?;
        let tenant_id = fields.required_str("tenant_id")?;
        validate_tenant_id(&tenant_id)?;
        let occurred_at = parse_timestamp(&fields.required_str("occurred_at")?)?;
        let kind = fields.required_str("kind")?;
        if !is_kind(&kind) {
            return Err(Rejection::new(RejectCode::BadKind, format!("kind {:?} must match ^[a-z][a-z0-9_]{{0,63}}$", truncate(&kind))));
        }
        let decision = match fields.optional_str("decision")? {
            None => None,
            Some(d) => Some(Decision::parse(&d).ok_or_else(|| {
                Rejection::new(
                    RejectCode::BadDecision,
                    format!("decision {:?} is not one of allow, deny, approval_required, throttled, budget_exceeded", truncate(&d)),
                )
            })?),
        };
        let event = Event {
            event_id,
            tenant_id,
            occurred_at,
            kind,
            decision,
            reason_code: fields.optional_id("reason_code")?,
            agent_id: fields.optional_id("agent_id")?,
            actor_id: fields.optional_id("actor_id")?,
            workspace_id: fields.optional_id("workspace_id")?,
            task_id: fields.optional_id("task_id")?,
            delegation: fields.delegation()?,
            action: fields.optional_id("action")?,
            policy_profile: fields.optional_id("policy_profile")?,
            quota_class: fields.optional_id("quota_class")?,
            usage: fields.usage()?,
            cost: fields.cost()?,
            reservation_id: fields.optional_id("reservation_id")?,
            attributes: fields.attributes()?,
        };
        fields.finish()?;
        Ok(event)
    }
}

/// Takes fields out of a JSON object one by one; whatever is left at the end is unknown.
struct Fields {
    map: Map<String, Value>,
    /// Prefix for error details, e.g. `cost.`.
    path: &'static str,
}

impl Fields {
    fn take(&mut self, name: &str) -> Option<Value> {
        // An explicit `null` means the same as an absent field.
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn missing(&self, name: &str) -> Rejection {
        Rejection::new(RejectCode::MissingField, format!("required field {}{name} is missing", self.path))
    }

    fn wrong_type(&self, name: &str, want: &str, got: &Value) -> Rejection {
        Rejection::new(RejectCode::WrongType, format!("field {}{name} must be {want}, found {}", self.path, type_name(got)))
    }

    fn optional_str(&mut self, name: &str) -> Result<Option<String>, Rejection> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(name, "a string", &other)),
        }
    }

    fn required_str(&mut self, name: &str) -> Result<String, Rejection> {
        self.optional_str(name)?.ok_or_else(|| self.missing(name))
    }

    fn optional_id(&mut self, name: &str) -> Result<Option<String>, Rejection> {
        let value = self.optional_str(name)?;
        if let Some(v) = &value {
            check_identifier(&format!("{}{name}", self.path), v)?;
        }
        Ok(value)
    }

    fn required_id(&mut self, name: &str) -> Result<String, Rejection> {
        self.optional_id(name)?.ok_or_else(|| self.missing(name))
    }

    fn object(&mut self, name: &'static str) -> Result<Option<Fields>, Rejection> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields { map, path: name_prefix(name) })),
            Some(other) => Err(self.wrong_type(name, "an object", &other)),
        }
    }

    fn delegation(&mut self) -> Result<Vec<String>, Rejection> {
        match self.take("delegation") {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => {
                        check_identifier(&format!("delegation[{i}]"), &s)?;
                        Ok(s)
                    }
                    other => Err(self.wrong_type(&format!("delegation[{i}]"), "a string", &other)),
                })
                .collect(),
            Some(other) => Err(self.wrong_type("delegation", "an array of strings", &other)),
        }
    }

    fn usage(&mut self) -> Result<Option<Usage>, Rejection> {
        let Some(mut usage) = self.object("usage")? else { return Ok(None) };
        let input_tokens = usage.token_count("input_tokens")?;
        let output_tokens = usage.token_count("output_tokens")?;
        usage.finish()?;
        Ok(Some(Usage { input_tokens, output_tokens }))
    }

    fn token_count(&mut self, name: &str) -> Result<u64, Rejection> {
        match self.take(name) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|t| *t <= MAX_TOKENS)
                .ok_or_else(|| Rejection::new(RejectCode::BadUsage, format!("{}{name} must be an integer 0..={MAX_TOKENS}, found {n}", self.path))),
            Some(other) => Err(self.wrong_type(name, "a non-negative integer", &other)),
        }
    }

    fn cost(&mut self) -> Result<Option<Cost>, Rejection> {
        let Some(mut cost) = self.object("cost")? else { return Ok(None) };
        let amount_micros = match cost.take("amount_micros") {
            None => return Err(cost.missing("amount_micros")),
            // Only JSON integers are money; `1.5` or `1e6` is a float even when whole.
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
                n.as_i64().ok_or_else(|| Rejection::new(RejectCode::WrongType, format!("cost.amount_micros {n} exceeds 64 bits")))?
            }
            Some(other) => return Err(cost.wrong_type("amount_micros", "an integer (micros)", &other)),
        };
        if amount_micros < 0 {
            return Err(Rejection::new(RejectCode::NegativeCost, format!("cost.amount_micros must be >= 0, found {amount_micros}")));
        }
        if amount_micros > MAX_AMOUNT_MICROS {
            return Err(Rejection::new(
                RejectCode::AmountTooLarge,
                format!("cost.amount_micros {amount_micros} is above the limit of {MAX_AMOUNT_MICROS} per event"),
            ));
        }
        let currency = cost.required_str("currency")?;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Rejection::new(RejectCode::BadCurrency, format!("cost.currency {:?} must be a three-letter ISO 4217 code", truncate(&currency))));
        }
        cost.finish()?;
        Ok(Some(Cost { amount_micros, currency }))
    }

    fn attributes(&mut self) -> Result<BTreeMap<String, String>, Rejection> {
        let Some(attrs) = self.object("attributes")? else { return Ok(BTreeMap::new()) };
        if attrs.map.len() > MAX_ATTRIBUTES {
            return Err(Rejection::new(RejectCode::WrongType, format!("attributes has {} entries; at most {MAX_ATTRIBUTES} are allowed", attrs.map.len())));
        }
        attrs
            .map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(Rejection::new(RejectCode::WrongType, format!("attributes.{} must be a string, found {}", truncate(&k), type_name(&other)))),
            })
            .collect()
    }

    fn finish(self) -> Result<(), Rejection> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(Rejection::new(RejectCode::UnknownField, format!("field {}{} is not part of the v1 event schema", self.path, truncate(k)))),
        }
    }
}

fn name_prefix(name: &'static str) -> &'static str {
    match name {
        "usage" => "usage.",
        "cost" => "cost.",
        "attributes" => "attributes.",
        _ => "",
    }
}

/// Checks an identifier (event, agent, task, … id): 1 to [`MAX_ID_CHARS`] characters, no control
/// characters. Shared by every place that takes an id from outside, so one id means one thing.
pub fn check_identifier(field: &str, value: &str) -> Result<(), Rejection> {
    let chars = value.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS || value.chars().any(char::is_control) {
        return Err(Rejection::new(RejectCode::BadIdentifier, format!("{field} must be 1 to {MAX_ID_CHARS} characters without control characters")));
    }
    Ok(())
}

fn is_kind(kind: &str) -> bool {
    let b = kind.as_bytes();
    !b.is_empty() && b.len() <= 64 && b[0].is_ascii_lowercase() && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// RFC 3339 with a mandatory offset (`Z` or `±hh:mm`); jiff alone would also take RFC 9557 forms.
fn parse_timestamp(s: &str) -> Result<Timestamp, Rejection> {
    let bad = |why: &str| Rejection::new(RejectCode::BadTimestamp, format!("occurred_at {:?} is not an RFC 3339 timestamp: {why}", truncate(s)));
    let b = s.as_bytes();
    let has_offset =
        b.last() == Some(&b'Z') || b.last() == Some(&b'z') || (b.len() > 6 && (b[b.len() - 6] == b'+' || b[b.len() - 6] == b'-') && b[b.len() - 3] == b':');
    if b.len() < 20 || !(b[10] == b'T' || b[10] == b't') || !has_offset || s.contains('[') {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS[.fraction](Z|±hh:mm)"));
    }
    s.parse::<Timestamp>().map_err(|e| bad(&e.to_string()))
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Keeps error details short when the offending value is huge.
pub(crate) fn truncate(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_string()
    } else {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "event_id": "evt-1",
            "tenant_id": "acme",
            "occurred_at": "2026-03-01T12:00:00+01:00",
            "kind": "llm_call",
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = base();
        v[field] = value;
        v
    }

    fn code_of(v: Value) -> RejectCode {
        Event::from_value(v).expect_err("must be rejected").code
    }

    /// An hour of clock skew is tolerated, a second more is not: after the message, and ahead
    /// of the reader's clock (the message's timestamp, else `occurred_at`).
    #[test]
    fn an_event_may_not_occur_after_its_message_nor_ahead_of_the_ledger() {
        let e = Event::from_value(base()).unwrap();
        let now = e.occurred_at + jiff::SignedDuration::from_hours(24);
        let published = e.occurred_at.as_millisecond() - MAX_CLOCK_AHEAD_SECONDS * 1_000;
        assert!(check_event_time(&e, Some(published), now).is_ok());
        let refused = check_event_time(&e, Some(published - 1_000), now).unwrap_err();
        assert_eq!(refused.code, RejectCode::OccurredAfterPublish);
        assert!(refused.detail.contains("3601 s after the message was published"), "{}", refused.detail);
        assert!(check_event_time(&e, Some(e.occurred_at.as_millisecond() + 1_000), now).is_ok());
        assert!(check_event_time(&e, None, now).is_ok());

        let soon = e.occurred_at - jiff::SignedDuration::from_secs(MAX_CLOCK_AHEAD_SECONDS);
        assert!(check_event_time(&e, Some(e.occurred_at.as_millisecond()), soon).is_ok());
        let early = soon - jiff::SignedDuration::from_secs(1);
        let ahead = check_event_time(&e, Some(e.occurred_at.as_millisecond()), early).unwrap_err();
        assert_eq!(ahead.code, RejectCode::TimestampInFuture);
        assert!(ahead.detail.contains("the message's timestamp"), "{}", ahead.detail);
        assert_eq!(check_event_time(&e, None, early).unwrap_err().code, RejectCode::TimestampInFuture, "occurred_at without a timestamp");
        // A timestamp out of any calendar's range is no timestamp: occurred_at is checked.
        assert!(check_event_time(&e, Some(i64::MAX), now).is_ok());
    }

    #[test]
    fn minimal_event_is_accepted_and_normalised_to_utc() {
        let e = Event::from_value(base()).unwrap();
        assert_eq!(e.tenant_id, "acme");
        let out = serde_json::to_value(&e).unwrap();
        assert_eq!(out["occurred_at"], "2026-03-01T11:00:00Z");
        assert!(out.get("usage").is_none(), "absent optionals are not serialised");
    }

    #[test]
    fn serialised_event_parses_back_identically() {
        let full = json!({
            "event_id": "e", "tenant_id": "t-1", "occurred_at": "2026-01-01T00:00:00.123456Z",
            "kind": "tool_call", "decision": "approval_required", "reason_code": "r",
            "agent_id": "a", "actor_id": "u", "workspace_id": "w", "task_id": "k",
            "delegation": ["outer", "inner"], "action": "gpt-5", "policy_profile": "p",
            "quota_class": "q", "usage": {"input_tokens": 3, "output_tokens": 4},
            "cost": {"amount_micros": 1500, "currency": "EUR"}, "reservation_id": "res",
            "attributes": {"k": "v"}
        });
        let e = Event::from_value(full).unwrap();
        let again = Event::from_json(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(e, again);
    }

    #[test]
    fn each_rule_has_its_own_code() {
        let mut no_id = base();
        no_id.as_object_mut().unwrap().remove("event_id");
        assert_eq!(code_of(no_id), RejectCode::MissingField);
        assert_eq!(code_of(with("event_id", json!(""))), RejectCode::BadIdentifier);
        assert_eq!(code_of(with("event_id", json!(7))), RejectCode::WrongType);
        assert_eq!(code_of(with("tenant_id", json!("Acme"))), RejectCode::BadTenantId);
        assert_eq!(code_of(with("tenant_id", json!("-acme"))), RejectCode::BadTenantId);
        assert_eq!(code_of(with("tenant_id", json!("a".repeat(64)))), RejectCode::BadTenantId);
        assert_eq!(code_of(with("occurred_at", json!("2026-03-01 12:00:00"))), RejectCode::BadTimestamp);
        assert_eq!(code_of(with("occurred_at", json!("2026-03-01T12:00:00"))), RejectCode::BadTimestamp);
        assert_eq!(code_of(with("occurred_at", json!("2026-02-30T12:00:00Z"))), RejectCode::BadTimestamp);
        assert_eq!(code_of(with("kind", json!("LLM"))), RejectCode::BadKind);
        assert_eq!(code_of(with("decision", json!("maybe"))), RejectCode::BadDecision);
        assert_eq!(code_of(with("cost", json!({"amount_micros": -1, "currency": "USD"}))), RejectCode::NegativeCost);
        assert_eq!(code_of(with("cost", json!({"amount_micros": 1.5, "currency": "USD"}))), RejectCode::WrongType);
        assert_eq!(code_of(with("cost", json!({"amount_micros": 1, "currency": "usd"}))), RejectCode::BadCurrency);
        assert_eq!(code_of(with("cost", json!({"currency": "USD"}))), RejectCode::MissingField);
        assert_eq!(code_of(with("usage", json!({"input_tokens": -3}))), RejectCode::BadUsage);
        assert_eq!(code_of(with("usage", json!({"output_tokens": MAX_TOKENS + 1}))), RejectCode::BadUsage);
        assert_eq!(code_of(with("cost", json!({"amount_micros": 9_000_000_000_000_000_000i64, "currency": "USD"}))), RejectCode::AmountTooLarge);
        assert!(Event::from_value(with("cost", json!({"amount_micros": MAX_AMOUNT_MICROS, "currency": "USD"}))).is_ok());
        assert!(Event::from_value(with("usage", json!({"input_tokens": MAX_TOKENS}))).is_ok());
        let dup = br#"{"event_id":"d3","tenant_id":"acme","occurred_at":"2026-03-01T12:00:00Z","kind":"x","event_id":"d4"}"#;
        assert_eq!(Event::from_json(dup).unwrap_err().code, RejectCode::DuplicateKey);
        assert_eq!(code_of(with("usage", json!({"tokens": 3}))), RejectCode::UnknownField);
        assert_eq!(code_of(with("delegation", json!(["a", 1]))), RejectCode::WrongType);
        assert_eq!(code_of(with("attributes", json!({"k": 1}))), RejectCode::WrongType);
        assert_eq!(code_of(with("colour", json!("red"))), RejectCode::UnknownField);
        assert_eq!(code_of(json!([1, 2])), RejectCode::NotAnObject);
        assert_eq!(Event::from_json(b"{\"event_id\": ").unwrap_err().code, RejectCode::MalformedJson);
    }

    #[test]
    fn null_means_absent() {
        let e = Event::from_value(with("cost", Value::Null)).unwrap();
        assert_eq!(e.cost, None);
        assert_eq!(code_of(with("event_id", Value::Null)), RejectCode::MissingField);
    }

    #[test]
    fn details_name_the_field() {
        let r = Event::from_value(with("cost", json!({"amount_micros": "12", "currency": "USD"}))).unwrap_err();
        assert!(r.detail.contains("cost.amount_micros"), "{}", r.detail);
        let r = Event::from_value(with("usage", json!({"output_tokens": 1, "x": 1}))).unwrap_err();
        assert!(r.detail.contains("usage.x"), "{}", r.detail);
    }

    #[test]
    fn tenant_id_pattern_boundaries() {
        for ok in ["a", "0", "a-b_c", &"a".repeat(63)] {
            assert!(validate_tenant_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_a", "a.b", "a b", "ä", &"a".repeat(64)] {
            assert!(validate_tenant_id(bad).is_err(), "{bad}");
        }
    }
}
