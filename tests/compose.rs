//! docker-compose.yml is parsed and checked: there is no Docker engine here to run it, so this is
//! what keeps it from rotting. Every `tally` service must run a real subcommand of this binary.

use std::path::Path;
use std::process::Command;

use serde_yaml::Value;

fn compose() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).expect("docker-compose.yml is YAML")
}

#[test]
fn kafka_runs_in_kraft_mode_and_topics_are_initialised() {
    let c = compose();
    let kafka = &c["services"]["kafka"];
    assert!(kafka["image"].as_str().unwrap().starts_with("apache/kafka:"), "official image");
    assert_eq!(kafka["environment"]["KAFKA_PROCESS_ROLES"].as_str(), Some("broker,controller"));
    let init = c["services"]["kafka-init"]["command"][0].as_str().unwrap();
    for topic in ["tally.events", "tally.events.dlq", "tally.budget"] {
        assert!(init.contains(&format!("--topic {topic} ")), "kafka-init creates {topic}");
    }
    assert!(init.contains("cleanup.policy=compact"), "tally.budget is compacted");
    assert_eq!(
        c["services"]["kafka-init"]["depends_on"]["kafka"]["condition"].as_str(),
        Some("service_healthy")
    );
}

#[test]
fn tally_services_build_from_the_dockerfile_and_run_real_subcommands() {
    let c = compose();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut tally_services = 0;
    for (name, service) in c["services"].as_mapping().unwrap() {
        if service["image"].as_str() != Some("tally:latest") {
            continue;
        }
        tally_services += 1;
        let name = name.as_str().unwrap();
        assert_eq!(service["build"].as_str(), Some("."), "{name} builds from the root Dockerfile");
        assert!(root.join("Dockerfile").exists());
        assert_eq!(service["environment"]["KAFKA_BOOTSTRAP"].as_str(), Some("kafka:9092"), "{name}");
        assert_eq!(
            service["depends_on"]["kafka-init"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{name} waits for the topics"
        );
        let args: Vec<&str> = service["command"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let mut help = args.clone();
        help.push("--help");
        let out = Command::new(env!("CARGO_BIN_EXE_tally")).args(&help).output().unwrap();
        assert!(out.status.success(), "{name}: `tally {}` is not a valid invocation: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    assert!(tally_services >= 1);
}

#[test]
fn the_ledger_and_query_services_share_a_volume_and_their_configs_are_valid() {
    let c = compose();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (service, table) in [("ledger", "ledger"), ("query", "query")] {
        let s = &c["services"][service];
        let volumes: Vec<&str> = s["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(volumes.iter().any(|v| v.starts_with("tally-data:/data")), "{service} mounts the shared data volume");
        let mounted = volumes.iter().find(|v| v.starts_with("./deploy/")).unwrap_or_else(|| panic!("{service} mounts its config"));
        let file = root.join(mounted.split(':').next().unwrap());
        let text: toml::Value = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let bootstrap = text.get("kafka").and_then(|k| k.get("bootstrap")).and_then(|b| b.as_str());
        assert!(bootstrap.is_none_or(|b| b == "kafka:9092"), "{service} talks to the compose broker");
        let section = toml::to_string(&text[table]).unwrap();
        match table {
            "ledger" => {
                let config: tally_ledger::service::ServiceConfig = toml::from_str(&section).unwrap();
                assert!(config.tokens.is_some(), "the ledger listens beyond loopback, so it needs tokens");
                assert!(config.keys.iter().all(|k| k.starts_with("/data")), "the key is on the volume keygen writes");
            }
            _ => {
                let config: tally_query::QueryConfig = toml::from_str(&section).unwrap();
                config.validate().unwrap();
            }
        }
    }
    assert!(c["services"]["query"]["volumes"][0].as_str().unwrap().ends_with(":ro"), "the query service only reads the ledger's data");
}
