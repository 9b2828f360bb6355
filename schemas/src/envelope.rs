//! One Kafka message → one validated event bound to its tenant.
//!
//! Three encodings are accepted (docs/events.md): a plain Tally event as JSON; a CloudEvents 1.0 event in
//! structured mode (`content-type: application/cloudevents+json`, the value holds the envelope); and
//! binary mode (`ce_*` headers, the value is the data). In both CloudEvents modes `data` is a Tally
//! event whose `event_id` may be omitted (it defaults to the CloudEvent `id`) and must otherwise equal
//! it; the idempotency key is the pair (`source`, `id`).
//!
//! Checks run cheapest first: key, size, encoding, then the event itself, then key = tenant_id.
//! The function is pure, so it is the single place where "is this message acceptable" is decided.

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{RejectCode, Rejection};
use crate::event::{truncate, type_name, Event};

/// Largest accepted message value, in bytes (60 KiB), personal fields counted as
/// [`PERSONAL_FIELD_BYTES`] more each.
pub const MAX_MESSAGE_BYTES: usize = 60 * 1024;

/// What each personal field (`actor_id`, each attribute) adds to a message's size for
/// [`MAX_MESSAGE_BYTES`]: its record holds a commitment (64 hex digits) under a longer name
/// instead of the value, so a message at the limit still makes a record that fits an entry.
pub const PERSONAL_FIELD_BYTES: usize = 80;

/// How the event arrived on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressFormat {
    Tally,
    CloudEventsStructured,
    CloudEventsBinary,
}

impl IngressFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            IngressFormat::Tally => "tally",
            IngressFormat::CloudEventsStructured => "cloudevents-structured",
            IngressFormat::CloudEventsBinary => "cloudevents-binary",
        }
    }
}

/// What makes two messages "the same event" for deduplication within one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey {
    /// The CloudEvents `source`; `None` for plain Tally events.
    pub source: Option<String>,
    /// The `event_id` (for CloudEvents, the CloudEvent `id`).
    pub id: String,
}

impl IdempotencyKey {
    /// An unambiguous byte encoding, for hashing into a dedup index: a plain id and a
    /// CloudEvents (source, id) pair can never encode alike.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.id.len() + 2);
        match &self.source {
            None => out.push(0),
            Some(source) => {
                out.push(1);
                out.extend_from_slice(&(source.len() as u64).to_be_bytes());
                out.extend_from_slice(source.as_bytes());
            }
        }
        out.extend_from_slice(self.id.as_bytes());
        out
    }
}

/// A message that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub event: Event,
    pub format: IngressFormat,
    pub key: IdempotencyKey,
    /// SHA-256 of the exact Kafka value, so a gateway can prove its own message was logged.
    pub payload_sha256: [u8; 32],
}

/// Decodes and validates one Kafka message. `headers` are (name, value) pairs as received.
pub fn decode_message(key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])]) -> Result<Decoded, Rejection> {
    let key = match key {
        None | Some([]) => return Err(Rejection::new(RejectCode::MissingKey, "message has no key; the key must be the tenant_id")),
        Some(k) => k,
    };
    if value.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(RejectCode::TooLarge, format!("value is {} bytes; at most {MAX_MESSAGE_BYTES} are accepted", value.len())));
    }
    let content_type = find_header(headers, "content-type").map(|v| String::from_utf8_lossy(v).to_ascii_lowercase());
    let media_type = content_type.as_deref().map(|ct| ct.split(';').next().unwrap_or("").trim().to_string());

    let (event, format, idem) = match media_type.as_deref() {
        Some("application/cloudevents+json") => decode_structured(value)?,
        Some(ct) if ct.starts_with("application/cloudevents") => {
            return Err(Rejection::new(RejectCode::UnsupportedContentType, format!("content-type {ct} is not accepted; send one event per message")))
        }
        _ if find_header(headers, "ce_specversion").is_some() => {
            if let Some(ct) = media_type.as_deref().filter(|ct| !is_json_media_type(ct)) {
                return Err(Rejection::new(RejectCode::UnsupportedContentType, format!("binary-mode CloudEvent data must be JSON, content-type is {ct}")));
            }
            decode_binary(value, headers)?
        }
        Some(ct) if !is_json_media_type(ct) => {
            return Err(Rejection::new(RejectCode::UnsupportedContentType, format!("content-type {ct} is not accepted; send JSON or CloudEvents")))
        }
        _ => {
            let event = Event::from_json(value)?;
            let idem = IdempotencyKey { source: None, id: event.event_id.clone() };
            (event, IngressFormat::Tally, idem)
        }
    };

    if key != event.tenant_id.as_bytes() {
        return Err(Rejection::new(
            RejectCode::TenantMismatch,
            format!("message key {:?} differs from tenant_id {:?}", truncate(&String::from_utf8_lossy(key)), event.tenant_id),
        ));
    }
    // The ledger records personal fields as commitments (docs/privacy.md), longer than short
    // values: the message must leave room for them, so that its record always fits an entry.
    let personal = event.attributes.len() + usize::from(event.actor_id.is_some());
    let with_commitments = value.len() + PERSONAL_FIELD_BYTES * personal;
    if with_commitments > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(
            RejectCode::TooLarge,
            format!(
                "value is {} bytes and has {personal} personal fields (actor_id, attributes), which count {PERSONAL_FIELD_BYTES} bytes each: {with_commitments} bytes; at most {MAX_MESSAGE_BYTES} are accepted",
                value.len()
            ),
        ));
    }
    Ok(Decoded { event, format, key: idem, payload_sha256: Sha256::digest(value).into() })
}

/// The last header of that name (case-insensitive), as Kafka clients read repeated headers.
fn find_header<'a>(headers: &[(&str, &'a [u8])], name: &str) -> Option<&'a [u8]> {
    headers.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
}

fn is_json_media_type(ct: &str) -> bool {
    ct == "application/json" || ct.ends_with("+json") || ct == "text/json"
}

/// The required context attributes of a CloudEvent (CloudEvents 1.0 §3.1).
struct Context {
    id: String,
    source: String,
}

fn check_context(get: &dyn Fn(&str) -> Option<Result<String, Rejection>>) -> Result<Context, Rejection> {
    let required = |name: &str| -> Result<String, Rejection> {
        match get(name) {
            None => Err(Rejection::new(RejectCode::BadCloudEvent, format!("cloudevent is missing required attribute {name}"))),
            Some(Err(e)) => Err(e),
            Some(Ok(s)) if s.is_empty() => Err(Rejection::new(RejectCode::BadCloudEvent, format!("cloudevent attribute {name} must not be empty"))),
            Some(Ok(s)) => Ok(s),
        }
    };
    let specversion = required("specversion")?;
    if specversion != "1.0" {
        return Err(Rejection::new(RejectCode::BadCloudEvent, format!("cloudevent specversion {:?} is not 1.0", truncate(&specversion))));
    }
    let id = required("id")?;
    let source = required("source")?;
    // The source is part of the idempotency key and of the stored record: bounded like an id.
    if source.chars().count() > crate::event::MAX_ID_CHARS || source.chars().any(char::is_control) {
        return Err(Rejection::new(
            RejectCode::BadCloudEvent,
            format!("cloudevent source must be at most {} characters without control characters", crate::event::MAX_ID_CHARS),
        ));
    }
    required("type")?;
    Ok(Context { id, source })
}

/// Turns CloudEvent `data` into a Tally event, filling or checking `event_id` against the `id`.
fn event_from_data(data: Value, ctx: Context, format: IngressFormat) -> Result<(Event, IngressFormat, IdempotencyKey), Rejection> {
    let mut data = match data {
        Value::Object(map) => map,
        other => return Err(Rejection::new(RejectCode::NotAnObject, format!("cloudevent data must be a Tally event object, found {}", type_name(&other)))),
    };
    match data.get("event_id") {
        None | Some(Value::Null) => {
            data.insert("event_id".into(), Value::String(ctx.id.clone()));
        }
        Some(Value::String(id)) if *id == ctx.id => {}
        Some(other) => {
            return Err(Rejection::new(RejectCode::BadCloudEvent, format!("data.event_id {} differs from the cloudevent id {:?}", other, truncate(&ctx.id))))
        }
    }
    let event = Event::from_value(Value::Object(data))?;
    Ok((event, format, IdempotencyKey { source: Some(ctx.source), id: ctx.id }))
}

fn decode_structured(value: &[u8]) -> Result<(Event, IngressFormat, IdempotencyKey), Rejection> {
    let envelope = crate::json::parse(value, "cloudevent")?;
    let Value::Object(mut envelope) = envelope else {
        return Err(Rejection::new(RejectCode::NotAnObject, "cloudevent must be a JSON object"));
    };
    let ctx = check_context(&|name| {
        envelope.get(name).map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(Rejection::new(RejectCode::BadCloudEvent, format!("cloudevent attribute {name} must be a string, found {}", type_name(other)))),
        })
    })?;
    if let Some(dct) = envelope.get("datacontenttype").and_then(Value::as_str) {
        let media = dct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !is_json_media_type(&media) {
            return Err(Rejection::new(RejectCode::UnsupportedContentType, format!("cloudevent datacontenttype {media} is not JSON")));
        }
    }
    let data = match (envelope.remove("data"), envelope.remove("data_base64")) {
        (Some(data), None) => data,
        (None, Some(Value::String(b64))) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| Rejection::new(RejectCode::BadCloudEvent, format!("cloudevent data_base64 is not base64: {e}")))?;
            crate::json::parse(&bytes, "cloudevent data_base64")?
        }
        (None, None) => {
            return Err(Rejection::new(RejectCode::MissingField, "cloudevent has no data"));
        }
        _ => return Err(Rejection::new(RejectCode::BadCloudEvent, "cloudevent must carry exactly one of data and data_base64 (as a string)")),
    };
    event_from_data(data, ctx, IngressFormat::CloudEventsStructured)
}

fn decode_binary(value: &[u8], headers: &[(&str, &[u8])]) -> Result<(Event, IngressFormat, IdempotencyKey), Rejection> {
    let ctx = check_context(&|name| {
        find_header(headers, &format!("ce_{name}"))
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| Rejection::new(RejectCode::BadCloudEvent, format!("header ce_{name} is not UTF-8"))))
    })?;
    let data = crate::json::parse(value, "cloudevent data")?;
    event_from_data(data, ctx, IngressFormat::CloudEventsBinary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(tenant: &str) -> Value {
        json!({"event_id": "e1", "tenant_id": tenant, "occurred_at": "2026-01-01T00:00:00Z", "kind": "llm_call"})
    }

    fn plain(key: Option<&[u8]>, v: &Value) -> Result<Decoded, Rejection> {
        decode_message(key, &serde_json::to_vec(v).unwrap(), &[])
    }

    #[test]
    fn plain_event_binds_to_its_key_and_hashes_the_exact_bytes() {
        let bytes = serde_json::to_vec(&event("acme")).unwrap();
        let d = decode_message(Some(b"acme"), &bytes, &[]).unwrap();
        assert_eq!(d.format, IngressFormat::Tally);
        assert_eq!(d.key, IdempotencyKey { source: None, id: "e1".into() });
        assert_eq!(d.payload_sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    }

    #[test]
    fn key_rules() {
        assert_eq!(plain(None, &event("acme")).unwrap_err().code, RejectCode::MissingKey);
        assert_eq!(plain(Some(b""), &event("acme")).unwrap_err().code, RejectCode::MissingKey);
        assert_eq!(plain(Some(b"other"), &event("acme")).unwrap_err().code, RejectCode::TenantMismatch);
    }

    #[test]
    fn duplicate_member_names_are_refused_in_every_encoding() {
        // The reported attack: last-one-wins would record globex's event under acme's key check.
        let twice = br#"{"event_id":"e1","tenant_id":"acme","tenant_id":"globex","occurred_at":"2026-01-01T00:00:00Z","kind":"llm_call"}"#;
        assert_eq!(decode_message(Some(b"globex"), twice, &[]).unwrap_err().code, RejectCode::DuplicateKey);
        let nested = br#"{"event_id":"e1","tenant_id":"acme","occurred_at":"2026-01-01T00:00:00Z","kind":"llm_call","cost":{"amount_micros":1,"amount_micros":2,"currency":"USD"}}"#;
        assert_eq!(decode_message(Some(b"acme"), nested, &[]).unwrap_err().code, RejectCode::DuplicateKey);
        let structured = br#"{"specversion":"1.0","id":"c1","id":"c2","source":"gw","type":"t","data":{"tenant_id":"acme","occurred_at":"2026-01-01T00:00:00Z","kind":"x"}}"#;
        let ce = [("content-type", &b"application/cloudevents+json"[..])];
        assert_eq!(decode_message(Some(b"acme"), structured, &ce).unwrap_err().code, RejectCode::DuplicateKey);
        let in_data = br#"{"specversion":"1.0","id":"c1","source":"gw","type":"t","data":{"tenant_id":"acme","occurred_at":"2026-01-01T00:00:00Z","kind":"x","kind":"y"}}"#;
        assert_eq!(decode_message(Some(b"acme"), in_data, &ce).unwrap_err().code, RejectCode::DuplicateKey);
        let binary: Vec<(&str, &[u8])> = vec![("ce_specversion", b"1.0"), ("ce_id", b"e1"), ("ce_source", b"gw"), ("ce_type", b"t")];
        assert_eq!(decode_message(Some(b"acme"), twice, &binary).unwrap_err().code, RejectCode::DuplicateKey);
    }

    #[test]
    fn size_limit_is_inclusive() {
        let mut v = event("acme");
        let base = serde_json::to_vec(&v).unwrap().len();
        v["attributes"] = json!({"pad": ""});
        let overhead = serde_json::to_vec(&v).unwrap().len() - base;
        // One personal field: the attribute.
        v["attributes"]["pad"] = Value::String("x".repeat(MAX_MESSAGE_BYTES - base - overhead - PERSONAL_FIELD_BYTES));
        assert_eq!(serde_json::to_vec(&v).unwrap().len(), MAX_MESSAGE_BYTES - PERSONAL_FIELD_BYTES);
        assert!(plain(Some(b"acme"), &v).is_ok());
        v["attributes"]["pad"] = Value::String("x".repeat(MAX_MESSAGE_BYTES - base - overhead - PERSONAL_FIELD_BYTES + 1));
        let refused = plain(Some(b"acme"), &v).unwrap_err();
        assert_eq!(refused.code, RejectCode::TooLarge);
        assert!(refused.detail.contains("1 personal fields"), "{}", refused.detail);
    }

    #[test]
    fn structured_cloudevent() {
        let mut data = event("acme");
        data.as_object_mut().unwrap().remove("event_id");
        let ce = json!({"specversion": "1.0", "id": "ce-9", "source": "gw/eu", "type": "tally.event", "data": data});
        let bytes = serde_json::to_vec(&ce).unwrap();
        let headers = [("content-type", &b"application/cloudevents+json; charset=utf-8"[..])];
        let d = decode_message(Some(b"acme"), &bytes, &headers).unwrap();
        assert_eq!(d.format, IngressFormat::CloudEventsStructured);
        assert_eq!(d.event.event_id, "ce-9");
        assert_eq!(d.key, IdempotencyKey { source: Some("gw/eu".into()), id: "ce-9".into() });

        let mut no_id = ce.clone();
        no_id.as_object_mut().unwrap().remove("id");
        let r = decode_message(Some(b"acme"), &serde_json::to_vec(&no_id).unwrap(), &headers).unwrap_err();
        assert_eq!(r.code, RejectCode::BadCloudEvent);
        assert!(r.detail.contains(" id"), "{}", r.detail);

        let mut contradicting = ce.clone();
        contradicting["data"]["event_id"] = json!("other");
        let r = decode_message(Some(b"acme"), &serde_json::to_vec(&contradicting).unwrap(), &headers).unwrap_err();
        assert_eq!(r.code, RejectCode::BadCloudEvent);

        let mut old = ce.clone();
        old["specversion"] = json!("0.3");
        let r = decode_message(Some(b"acme"), &serde_json::to_vec(&old).unwrap(), &headers).unwrap_err();
        assert_eq!(r.code, RejectCode::BadCloudEvent);
    }

    #[test]
    fn structured_cloudevent_with_base64_data() {
        let data = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&event("acme")).unwrap());
        let long = json!({"specversion": "1.0", "id": "e1", "source": "s".repeat(257), "type": "t", "data": {"tenant_id": "acme", "occurred_at": "2026-11-02T09:15:00Z", "kind": "llm_call"}});
        let err = decode_message(Some(b"acme"), long.to_string().as_bytes(), &[("content-type", b"application/cloudevents+json")]).unwrap_err();
        assert_eq!(err.code, RejectCode::BadCloudEvent, "{err:?}");
        let ce = json!({"specversion": "1.0", "id": "e1", "source": "s", "type": "t", "data_base64": data});
        let headers = [("Content-Type", &b"application/cloudevents+json"[..])];
        let d = decode_message(Some(b"acme"), &serde_json::to_vec(&ce).unwrap(), &headers).unwrap();
        assert_eq!(d.event.event_id, "e1");
    }

    #[test]
    fn binary_cloudevent() {
        let value = serde_json::to_vec(&event("acme")).unwrap();
        let mut headers: Vec<(&str, &[u8])> =
            vec![("ce_specversion", b"1.0"), ("ce_id", b"e1"), ("ce_source", b"gw/us"), ("ce_type", b"tally.event"), ("content-type", b"application/json")];
        let d = decode_message(Some(b"acme"), &value, &headers).unwrap();
        assert_eq!(d.format, IngressFormat::CloudEventsBinary);
        assert_eq!(d.key.source.as_deref(), Some("gw/us"));

        let mut control = headers.clone();
        control.retain(|(n, _)| *n != "ce_source");
        control.push(("ce_source", b"gw\x00evil"));
        assert_eq!(decode_message(Some(b"acme"), &value, &control).unwrap_err().code, RejectCode::BadCloudEvent, "control characters in the source");

        headers.retain(|(n, _)| *n != "ce_id");
        assert_eq!(decode_message(Some(b"acme"), &value, &headers).unwrap_err().code, RejectCode::BadCloudEvent);
    }

    #[test]
    fn other_content_types_are_refused() {
        let value = serde_json::to_vec(&event("acme")).unwrap();
        for ct in ["text/plain", "application/cloudevents-batch+json", "application/avro"] {
            let r = decode_message(Some(b"acme"), &value, &[("content-type", ct.as_bytes())]).unwrap_err();
            assert_eq!(r.code, RejectCode::UnsupportedContentType, "{ct}");
        }
        assert!(decode_message(Some(b"acme"), &value, &[("content-type", b"application/json")]).is_ok());
    }

    #[test]
    fn garbage_is_malformed_json() {
        for bad in [&b"{\"event_id\": \"e1\", \"tenant"[..], b"\xff\xfe", b"", b"nul"] {
            assert_eq!(decode_message(Some(b"acme"), bad, &[]).unwrap_err().code, RejectCode::MalformedJson);
        }
    }

    #[test]
    fn idempotency_key_encodings_are_unambiguous() {
        let plain = IdempotencyKey { source: None, id: "\u{1}\0\0\0\0\0\0\0\0x".into() };
        let ce = IdempotencyKey { source: Some(String::new()), id: "x".into() };
        assert_ne!(plain.to_bytes(), ce.to_bytes());
    }
}
