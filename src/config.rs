//! The CLI's configuration: a TOML file (optional) plus environment overrides, validated at start.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use tally_ingest::KafkaConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The ledger service (`tally ledger`).
    #[serde(default)]
    pub ledger: Option<tally_ledger::service::ServiceConfig>,
    /// The query service (`tally query`).
    #[serde(default)]
    pub query: Option<tally_query::QueryConfig>,
}

impl CliConfig {
    /// Reads `path` (when given) and applies the environment overrides in `vars`.
    pub fn load(path: Option<&Path>, vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let mut config = match path {
            None => CliConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?
            }
        };
        config.kafka.apply_env(vars);
        Ok(config)
    }
}
