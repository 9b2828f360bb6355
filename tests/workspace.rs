//! Properties of the workspace itself, checked with cargo: the query service builds without
//! Kafka, and `-p tally-query` resolves the same features as the workspace, so DataFusion (an
//! 11-minute cold build) is compiled once whichever way the project is built.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

fn cargo_tree(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--locked", "--prefix", "none"])
        .args(args)
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Package (name and version) → the features cargo resolved for it.
fn features(args: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in cargo_tree(&[args, &["-f", "{p}|{f}"]].concat()).lines() {
        let Some((package, features)) = line.split_once('|') else { continue };
        let package = package.trim_end_matches(" (*)").split(" (").next().unwrap().trim().to_string();
        out.entry(package).or_default().extend(features.split(',').map(|f| f.trim_end_matches(" (*)").trim()).filter(|f| !f.is_empty()).map(String::from));
    }
    out
}

#[test]
fn one_datafusion_build() {
    for edges in ["normal,build", "normal,build,dev"] {
        let query = features(&["-p", "tally-query", "-e", edges]);
        let workspace = features(&["--workspace", "-e", edges]);
        assert!(query.keys().any(|p| p.starts_with("datafusion ")), "no datafusion in {query:?}");
        let differ: Vec<String> = query
            .iter()
            .filter(|(p, _)| !p.starts_with("tally"))
            .filter_map(|(p, f)| {
                let w = &workspace[p];
                (w != f).then(|| format!("{p}: the workspace adds {:?}", w.difference(f).collect::<Vec<_>>()))
            })
            .collect();
        assert!(
            differ.is_empty(),
            "with {edges} edges, `-p tally-query` resolves other features than the workspace, so DataFusion would be built twice; name these features in query/Cargo.toml's unification section:\n{}",
            differ.join("\n")
        );
    }
}

#[test]
fn the_query_service_has_no_kafka_and_the_log_core_budgets_and_sql_gate_no_kafka_parquet_or_tokio() {
    let query = cargo_tree(&["-p", "tally-query", "-e", "normal", "-f", "{p}"]);
    assert!(query.lines().any(|l| l.starts_with("datafusion ")), "{query}");
    assert!(!query.lines().any(|l| l.starts_with("rdkafka")), "tally-query depends on rdkafka:\n{query}");
    // The log core, and the crates the fuzz targets build on their own: budgets and the SQL gate.
    for (krate, forbidden) in [
        ("tally-log", &["rdkafka ", "parquet ", "tokio ", "datafusion"][..]),
        ("tally-budget", &["rdkafka ", "parquet ", "tokio ", "datafusion"][..]),
        ("tally-sql-gate", &["rdkafka ", "parquet ", "tokio ", "datafusion", "arrow"][..]),
    ] {
        let tree = cargo_tree(&["-p", krate, "-e", "normal", "-f", "{p}"]);
        for f in forbidden {
            assert!(!tree.lines().any(|l| l.starts_with(f)), "{krate} depends on {f}:\n{tree}");
        }
    }
}
