//! The one JSON parser for untrusted event bytes: I-JSON (RFC 7493) member names.
//!
//! `serde_json` keeps the last of two members with the same name. Other parsers (a gateway's, an
//! auditor's) may keep the first, so the same bytes would mean two different events to two
//! readers, and a signed log would attest to something its producer never meant. Every object, at
//! any depth, must therefore name each member once; a duplicate is rejected with
//! [`RejectCode::DuplicateKey`]. Nesting depth stays bounded by `serde_json`'s recursion limit
//! (128), which this parser inherits.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::{RejectCode, Rejection};

/// The text every duplicate-name error starts with; how [`parse`] tells it from a syntax error.
const DUPLICATE: &str = "duplicate member name";

/// Parses `bytes` as JSON, refusing duplicate member names at any depth. `what` names the value
/// in the rejection's detail (e.g. "value", "cloudevent data").
pub fn parse(bytes: &[u8], what: &str) -> Result<Value, Rejection> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(value)) => Ok(value),
        Err(e) if e.to_string().starts_with(DUPLICATE) => Err(Rejection::new(RejectCode::DuplicateKey, format!("{what}: {e}"))),
        Err(e) => Err(Rejection::new(RejectCode::MalformedJson, format!("{what} is not valid JSON: {e}"))),
    }
}

/// A JSON value whose objects were checked for duplicate member names while parsing.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                let shown: String = name.chars().take(64).collect();
                return Err(de::Error::custom(format!("{DUPLICATE} {shown:?}")));
            }
            let Strict(value) = access.next_value()?;
            map.insert(name, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        for text in [
            r#"{"tenant_id":"acme","tenant_id":"globex"}"#,
            r#"{"a":{"b":1,"b":2}}"#,
            r#"[{"x":1},{"y":1,"y":1}]"#,
            r#"{"event_id":"d3","kind":"x","event_id":"d4"}"#,
        ] {
            let r = parse(text.as_bytes(), "value").unwrap_err();
            assert_eq!(r.code, RejectCode::DuplicateKey, "{text}: {r}");
            assert!(r.detail.contains("duplicate member name"), "{}", r.detail);
        }
    }

    #[test]
    fn everything_else_parses_as_serde_json_does() {
        for text in [r#"{"a":1,"b":[1,-2,3.5,"x",null,true],"c":{"a":{}}}"#, "[]", "1", r#""s""#, r#"{"a":{"a":1}}"#] {
            assert_eq!(parse(text.as_bytes(), "value").unwrap(), serde_json::from_str::<Value>(text).unwrap(), "{text}");
        }
        assert_eq!(parse(b"{\"a\":", "value").unwrap_err().code, RejectCode::MalformedJson);
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert_eq!(parse(deep.as_bytes(), "value").unwrap_err().code, RejectCode::MalformedJson, "depth stays bounded");
    }
}
