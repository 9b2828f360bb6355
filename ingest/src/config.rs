//! Kafka connection settings shared by every Tally command that talks to Kafka.
//!
//! `bootstrap` plus a pass-through map of librdkafka properties (`[kafka.librdkafka]` in TOML).
//! Overrides come from the environment, given explicitly by the binary (this crate never reads the
//! process environment itself): `KAFKA_BOOTSTRAP` replaces `bootstrap`, and `TALLY_RDKAFKA_<NAME>`
//! sets the librdkafka property `<name>` with `_` read as `.` (`TALLY_RDKAFKA_SECURITY_PROTOCOL=ssl`
//! sets `security.protocol`).

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Properties Tally sets itself; a pass-through value for one of them would silently break a
/// guarantee (ordering, exactly-once offsets), so it is refused at start.
const RESERVED: &[&str] = &["bootstrap.servers", "enable.auto.commit", "enable.auto.offset.store", "group.id"];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list. Prefer `127.0.0.1` to `localhost` (see README).
    #[serde(default = "default_bootstrap")]
    pub bootstrap: String,
    /// librdkafka properties passed through unchanged (e.g. `security.protocol`).
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

fn default_bootstrap() -> String {
    "127.0.0.1:9092".to_string()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig { bootstrap: default_bootstrap(), librdkafka: BTreeMap::new() }
    }
}

impl KafkaConfig {
    pub fn with_bootstrap(bootstrap: impl Into<String>) -> Self {
        KafkaConfig { bootstrap: bootstrap.into(), ..KafkaConfig::default() }
    }

    /// Applies `KAFKA_BOOTSTRAP` and `TALLY_RDKAFKA_*` overrides from the given variables.
    pub fn apply_env<I, K, V>(&mut self, vars: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        for (key, value) in vars {
            let key = key.as_ref();
            if key == "KAFKA_BOOTSTRAP" {
                self.bootstrap = value.into();
            } else if let Some(prop) = key.strip_prefix("TALLY_RDKAFKA_") {
                self.librdkafka.insert(prop.to_ascii_lowercase().replace('_', "."), value.into());
            }
        }
    }

    /// Checks the settings, naming the bad key.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap.trim().is_empty() {
            return Err(Error::Config("kafka.bootstrap is empty".into()));
        }
        for server in self.bootstrap.split(',') {
            let server = server.trim();
            let port = server.rsplit_once(':').map(|(_, p)| p);
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return Err(Error::Config(format!("kafka.bootstrap entry {server:?} is not host:port")));
            }
        }
        for key in self.librdkafka.keys() {
            if RESERVED.contains(&key.as_str()) {
                return Err(Error::Config(format!("kafka.librdkafka.{key} is set by tally itself and cannot be overridden")));
            }
        }
        Ok(())
    }

    /// A librdkafka configuration with the bootstrap and every pass-through property.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.librdkafka {
            cfg.set(k, v);
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_then_env_overrides() {
        let mut cfg: KafkaConfig = toml::from_str("bootstrap = \"10.0.0.1:9092\"\n[librdkafka]\n\"socket.timeout.ms\" = \"5000\"\n").unwrap();
        cfg.apply_env([
            ("KAFKA_BOOTSTRAP", "127.0.0.1:19092"),
            ("TALLY_RDKAFKA_SECURITY_PROTOCOL", "ssl"),
            ("UNRELATED", "x"),
            ("TALLY_BROKER_DATA", "/tmp/not-a-kafka-property"),
        ]);
        assert_eq!(cfg.bootstrap, "127.0.0.1:19092");
        assert_eq!(cfg.librdkafka["security.protocol"], "ssl");
        assert_eq!(cfg.librdkafka["socket.timeout.ms"], "5000");
        assert_eq!(cfg.librdkafka.len(), 2);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = toml::from_str::<KafkaConfig>("bootstrp = \"x:1\"").unwrap_err();
        assert!(err.to_string().contains("bootstrp"), "{err}");
        let err = KafkaConfig::with_bootstrap("127.0.0.1").validate().unwrap_err();
        assert!(err.to_string().contains("kafka.bootstrap"), "{err}");
        let mut cfg = KafkaConfig::default();
        cfg.librdkafka.insert("enable.auto.commit".into(), "true".into());
        assert!(cfg.validate().unwrap_err().to_string().contains("kafka.librdkafka.enable.auto.commit"));
    }
}
