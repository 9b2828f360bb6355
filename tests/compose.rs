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
    assert_eq!(c["services"]["kafka-init"]["depends_on"]["kafka"]["condition"].as_str(), Some("service_healthy"));
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
        assert_eq!(service["depends_on"]["kafka-init"]["condition"].as_str(), Some("service_completed_successfully"), "{name} waits for the topics");
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
                assert!(
                    config.keys.iter().all(|k| k.starts_with("/keys/")),
                    "the key is on its own volume (see only_keygen_and_the_ledger_mount_the_signing_key)"
                );
            }
            _ => {
                let config: tally_query::QueryConfig = toml::from_str(&section).unwrap();
                config.validate().unwrap();
            }
        }
    }
    assert!(c["services"]["query"]["volumes"][0].as_str().unwrap().ends_with(":ro"), "the query service only reads the ledger's data");
}

/// (source, target) of each of a service's volumes: `tally-data:/data:ro` is `("tally-data", "/data")`.
fn mounts(c: &Value, service: &str) -> Vec<(String, String)> {
    c["services"][service]["volumes"]
        .as_sequence()
        .map(|v| {
            v.iter()
                .map(|m| {
                    let mut parts = m.as_str().unwrap().split(':');
                    (parts.next().unwrap().to_string(), parts.next().unwrap().to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The source of the mount that holds `path` inside `service` (the deepest mount above it).
fn volume_holding(c: &Value, service: &str, path: &Path) -> Option<String> {
    mounts(c, service).into_iter().filter(|(_, target)| path.starts_with(target)).max_by_key(|(_, target)| target.len()).map(|(source, _)| source)
}

fn ledger_config() -> tally_ledger::service::ServiceConfig {
    let text: toml::Value = toml::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ledger.toml")).unwrap()).unwrap();
    toml::from_str(&toml::to_string(&text["ledger"]).unwrap()).unwrap()
}

/// The signing key must not be readable by the query service (or anything but the ledger and the
/// keygen that writes it): it is on a volume of its own, which only those two mount.
#[test]
fn only_keygen_and_the_ledger_mount_the_signing_key() {
    let c = compose();
    let config = ledger_config();
    let keygen: Vec<&str> = c["services"]["keygen"]["command"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let out = keygen.iter().position(|a| *a == "--out").map(|i| Path::new(keygen[i + 1])).unwrap();
    assert_eq!(config.keys.first().map(|k| k.as_path()), Some(out), "the ledger signs with the key keygen writes");
    for key in &config.keys {
        let volume = volume_holding(&c, "ledger", key).unwrap_or_else(|| panic!("{} is on no volume of the ledger", key.display()));
        assert!(c["volumes"].get(volume.as_str()).is_some(), "{volume} is a named volume, not a host path");
        assert_eq!(volume_holding(&c, "keygen", out).as_deref(), Some(volume.as_str()), "keygen writes the key onto that volume");
        for (name, _) in c["services"].as_mapping().unwrap() {
            let name = name.as_str().unwrap();
            if mounts(&c, name).iter().any(|(source, _)| *source == volume) {
                assert!(["keygen", "ledger"].contains(&name), "{name} mounts {volume}, which holds the ledger's signing key");
            }
        }
    }
    // The token file (hashes only) stays where both services read it, away from the key.
    let tokens = config.tokens.unwrap();
    let data = volume_holding(&c, "ledger", &tokens).unwrap();
    assert_eq!(volume_holding(&c, "query", &tokens).as_deref(), Some(data.as_str()), "query reads the ledger's token file");
    assert!(!config.keys.iter().any(|k| volume_holding(&c, "ledger", k).as_deref() == Some(data.as_str())));
}
