//! The Kafka edge: client settings, topics, the idempotent publisher and the dev
//! broker. Everything that talks Kafka protocol goes through here.
//!
//! Guarantees: every client gets `KAFKA_BOOTSTRAP_SERVERS` and the pass-through
//! `KAFKA_LIBRDKAFKA_*` properties (applied last, so ops can override any default
//! set here); topic names are `{KAFKA_TOPIC_PREFIX}{table}`.

pub mod consumer;
pub mod devbroker;
pub mod features;
mod ffi;
pub mod groups;
pub mod memory;
pub mod publish;
pub mod topics;

use rdkafka::ClientConfig;

use crate::catalogue::Table;
use crate::config::KafkaConfig;

pub use devbroker::DevBroker;
pub use ffi::identities;
pub use publish::{PublishError, Publisher, Settled};

/// What can go wrong setting up a Kafka client.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("KAFKA_BOOTSTRAP_SERVERS is not set")]
    NoBootstrap,
    #[error(transparent)]
    Features(#[from] features::MissingFeatures),
    #[error("cannot create the Kafka {role}: {cause}")]
    Client {
        role: &'static str,
        cause: rdkafka::error::KafkaError,
    },
}

/// The topic that carries `table`.
pub fn topic_name(prefix: &str, table: Table) -> String {
    format!("{prefix}{}", table.name())
}

/// The table a topic carries, if it is one of ours.
pub fn table_of_topic(prefix: &str, topic: &str) -> Option<Table> {
    topic.strip_prefix(prefix)?.parse().ok()
}

/// Base settings for any client: the servers, then `defaults`, then the
/// pass-through properties. Refused when this build of librdkafka lacks a feature
/// they need (see [`features`]).
pub fn client_config(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> Result<ClientConfig, KafkaSetupError> {
    let servers = kafka.bootstrap_servers.as_deref().ok_or(KafkaSetupError::NoBootstrap)?;
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", servers);
    // librdkafka logs through the context; keep its chatter at warnings, unless
    // KAFKA_LIBRDKAFKA_DEBUG asks for its debug contexts (target `librdkafka`,
    // shown at any LOG_LEVEL then: see telemetry::init_all).
    config.set_log_level(if kafka.librdkafka_debug() {
        rdkafka::config::RDKafkaLogLevel::Debug
    } else {
        rdkafka::config::RDKafkaLogLevel::Warning
    });
    for (name, value) in defaults {
        config.set(*name, *value);
    }
    for (name, value) in &kafka.librdkafka {
        config.set(name, value.expose());
    }
    features::check(&config)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_tables_and_back() {
        for table in Table::ALL {
            let topic = topic_name("dwh.", table);
            assert_eq!(topic, format!("dwh.{}", table.name()));
            assert_eq!(table_of_topic("dwh.", &topic), Some(table));
        }
        assert_eq!(table_of_topic("dwh.", "other.events_part"), None);
        assert_eq!(table_of_topic("dwh.", "dwh.nope"), None);
    }

    #[test]
    fn pass_through_properties_override_defaults() {
        let config = crate::config::Config::from_vars(
            [
                ("KAFKA_BOOTSTRAP_SERVERS", "k:9092"),
                ("KAFKA_LIBRDKAFKA_LINGER_MS", "50"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect("valid");
        let client = client_config(&config.kafka, &[("linger.ms", "5"), ("acks", "all")]).expect("config");
        assert_eq!(client.get("bootstrap.servers"), Some("k:9092"));
        assert_eq!(client.get("linger.ms"), Some("50"));
        assert_eq!(client.get("acks"), Some("all"));
        let none = crate::config::Config::from_vars(std::iter::empty()).expect("defaults");
        assert!(matches!(
            client_config(&none.kafka, &[]),
            Err(KafkaSetupError::NoBootstrap)
        ));
    }
}
