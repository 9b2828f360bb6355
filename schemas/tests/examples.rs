//! Every file in `schemas/examples/` is checked by both the JSON Schema (with an independent
//! JSON-Schema implementation) and the Rust validator; the test fails if they disagree, or if an
//! invalid example is rejected for another reason than the code its name announces
//! (`invalid/<code>--<what>.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tally_schemas::{Event, RejectCode};

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(sub)
}

fn examples(sub: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir(sub))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("event-v1.schema.json")).unwrap();
    let schema: Value = serde_json::from_slice(&text).unwrap();
    jsonschema::draft202012::new(&schema).expect("event-v1.schema.json compiles")
}

#[test]
fn valid_examples_pass_both_validators() {
    let schema = schema_validator();
    let valid = examples("valid");
    assert!(valid.len() >= 5, "expected several valid examples, found {}", valid.len());
    for (name, bytes) in valid {
        let rust = Event::from_json(&bytes);
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        let errors: Vec<String> = schema.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(rust.is_ok(), "{name}: rust validator rejects: {:?}", rust.err());
        assert!(errors.is_empty(), "{name}: JSON Schema rejects: {errors:?}");
    }
}

#[test]
fn invalid_examples_fail_both_validators_with_the_named_code() {
    let schema = schema_validator();
    let invalid = examples("invalid");
    assert!(invalid.len() >= 10, "expected many invalid examples, found {}", invalid.len());
    for (name, bytes) in invalid {
        let expected = name.split("--").next().and_then(RejectCode::from_wire);
        let expected = expected.unwrap_or_else(|| panic!("{name}: file name must start with a reject code"));
        let rejection = Event::from_json(&bytes).expect_err(&name);
        assert_eq!(rejection.code, expected, "{name}: {}", rejection.detail);
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(!schema.is_valid(&json), "{name}: rust rejects ({rejection}) but the JSON Schema accepts");
    }
}
