//! The dev broker: librdkafka's in-memory mock cluster with the seven table topics.
//!
//! Guarantees: once [`DevBroker::start`] returns, the topics exist and clients in
//! this or other processes can connect at [`DevBroker::bootstrap_servers`]. It
//! keeps at most 5 MiB (or 100,000 message batches) per partition; older batches
//! are dropped silently, like a tiny retention. Dropping the value stops it.

use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::ClientConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::{ffi, topic_name};
use crate::catalogue::Table;

/// What the mock cluster keeps per partition before it drops the oldest data.
pub const PARTITION_LIMIT_BYTES: usize = 5 * 1024 * 1024;

/// How to start a dev broker.
#[derive(Debug, Clone)]
pub struct DevBrokerOptions {
    pub brokers: u16,
    pub partitions: i32,
    pub topic_prefix: String,
    /// Serve broker `i` (from 1) on `port + i - 1` of `bind_host` instead of an
    /// ephemeral loopback port.
    pub port: Option<u16>,
    pub bind_host: String,
    /// The host clients are told to connect to (defaults to `bind_host`, or
    /// 127.0.0.1 when that is a wildcard).
    pub advertised_host: Option<String>,
    /// Kafka's `group.initial.rebalance.delay.ms`.
    pub initial_rebalance_delay_ms: i32,
}

impl Default for DevBrokerOptions {
    fn default() -> Self {
        DevBrokerOptions {
            brokers: 1,
            partitions: 4,
            topic_prefix: "dwh.".into(),
            port: None,
            bind_host: "127.0.0.1".into(),
            advertised_host: None,
            initial_rebalance_delay_ms: 200,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevBrokerError {
    #[error("cannot start the mock cluster: {0}")]
    Start(rdkafka::error::KafkaError),
    #[error("cannot create topic {topic}: {cause}")]
    Topic {
        topic: String,
        cause: rdkafka::error::KafkaError,
    },
    #[error("cannot listen on {address}: {cause}")]
    Listen { address: String, cause: std::io::Error },
    #[error("the mock cluster did not accept setting {0}")]
    Setting(&'static str),
}

/// A running dev broker.
#[allow(missing_debug_implementations)] // holds a librdkafka handle with no useful Debug
pub struct DevBroker {
    /// The client that owns the mock cluster; the cluster lives as long as it does.
    _owner: BaseProducer,
    bootstrap: String,
    forwarders: JoinSet<()>,
}

impl DevBroker {
    /// Starts the cluster and creates the seven topics. Must run inside a Tokio
    /// runtime when `port` is set (the forwarders are tasks).
    pub async fn start(options: &DevBrokerOptions) -> Result<Self, DevBrokerError> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", options.brokers.max(1).to_string())
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Error)
            .create()
            .map_err(DevBrokerError::Start)?;
        if !ffi::set_initial_rebalance_delay(owner.client(), options.initial_rebalance_delay_ms) {
            return Err(DevBrokerError::Setting("the initial rebalance delay"));
        }
        let cluster =
            owner
                .client()
                .mock_cluster()
                .ok_or(DevBrokerError::Start(rdkafka::error::KafkaError::MockCluster(
                    rdkafka::types::RDKafkaErrorCode::Fail,
                )))?;
        for table in Table::ALL {
            let topic = topic_name(&options.topic_prefix, table);
            cluster
                .create_topic(&topic, options.partitions, 1)
                .map_err(|cause| DevBrokerError::Topic { topic, cause })?;
        }
        let internal: Vec<String> = cluster.bootstrap_servers().split(',').map(str::to_owned).collect();
        drop(cluster);
        let mut forwarders = JoinSet::new();
        let bootstrap = match options.port {
            None => internal.join(","),
            Some(base) => {
                let advertised = options.advertised_host.clone().unwrap_or_else(|| {
                    if options.bind_host == "0.0.0.0" || options.bind_host == "::" {
                        "127.0.0.1".into()
                    } else {
                        options.bind_host.clone()
                    }
                });
                let mut public = Vec::new();
                for (index, target) in internal.iter().enumerate() {
                    let port = base + index as u16;
                    let address = format!("{}:{port}", options.bind_host);
                    let listener = TcpListener::bind(&address)
                        .await
                        .map_err(|cause| DevBrokerError::Listen { address, cause })?;
                    if !ffi::set_advertised_listener(owner.client(), index as i32 + 1, &advertised, port) {
                        return Err(DevBrokerError::Setting("the advertised listener"));
                    }
                    forwarders.spawn(forward(listener, target.clone()));
                    public.push(format!("{advertised}:{port}"));
                }
                public.join(",")
            }
        };
        Ok(DevBroker {
            _owner: owner,
            bootstrap,
            forwarders,
        })
    }

    /// The `bootstrap.servers` clients use.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Takes broker `broker_id` (1-based) down: its connections are cut and new
    /// ones refused, as in a broker outage; `up` brings it back. For tests.
    pub fn set_broker_up(&self, broker_id: i32, up: bool) -> Result<(), DevBrokerError> {
        if ffi::set_broker_up(self._owner.client(), broker_id, up) {
            Ok(())
        } else {
            Err(DevBrokerError::Setting("a broker's availability"))
        }
    }

    /// Stops the forwarders; the cluster stops when the value is dropped.
    pub fn stop(mut self) {
        self.forwarders.abort_all();
    }
}

/// Relays every connection on `listener` to the mock broker at `target`.
async fn forward(listener: TcpListener, target: String) {
    loop {
        let Ok((mut inbound, peer)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            match TcpStream::connect(&target).await {
                Ok(mut outbound) => {
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(e) => tracing::warn!(%peer, target, error = %e, "dev broker cannot reach its mock broker"),
            }
        });
    }
}
