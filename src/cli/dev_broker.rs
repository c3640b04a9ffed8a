//! `dwh-helper dev-broker`: the in-memory mock cluster in the foreground.

use clap::Args;

use crate::kafka::devbroker::{DevBrokerOptions, PARTITION_LIMIT_BYTES};
use crate::kafka::DevBroker;

#[derive(Debug, Args)]
#[command(after_help = format!(
    "The dev broker is librdkafka's mock cluster: everything is in memory and gone when it stops. \
     Each partition keeps at most {} MiB (or 100,000 message batches); older data is dropped silently, \
     like a tiny retention, so size backlogs with enough partitions. Admin CreateTopics is not \
     supported (topics are created at start) and timestamp lookups return -1.\n\n\
     The first line of stdout is the bootstrap address to use as KAFKA_BOOTSTRAP_SERVERS; \
     SIGINT or SIGTERM stops it.",
    PARTITION_LIMIT_BYTES / (1024 * 1024)
))]
pub struct DevBrokerArgs {
    /// Number of brokers in the cluster
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    brokers: u16,
    /// Partitions of each of the seven table topics
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=1000))]
    partitions: i32,
    /// Topic name prefix (the topics are {prefix}{table})
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "dwh.")]
    topic_prefix: String,
    /// Serve broker N on port PORT+N-1 instead of an ephemeral port
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on with --port (0.0.0.0 for other hosts)
    #[arg(long, default_value = "127.0.0.1", requires = "port")]
    bind_host: String,
    /// Host name clients are told to connect to with --port
    #[arg(long, requires = "port")]
    advertised_host: Option<String>,
    /// How long a new consumer group waits for members before assigning (Kafka's
    /// group.initial.rebalance.delay.ms)
    #[arg(long, default_value_t = 200)]
    rebalance_delay_ms: i32,
}

pub async fn dev_broker(args: DevBrokerArgs) -> anyhow::Result<()> {
    let options = DevBrokerOptions {
        brokers: args.brokers,
        partitions: args.partitions,
        topic_prefix: args.topic_prefix,
        port: args.port,
        bind_host: args.bind_host,
        advertised_host: args.advertised_host,
        initial_rebalance_delay_ms: args.rebalance_delay_ms,
    };
    let broker = DevBroker::start(&options).await?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", broker.bootstrap_servers())?;
        out.flush()?;
    }
    eprintln!(
        "dev broker: {} broker(s), topics {}<table> with {} partitions each, at {}; Ctrl-C stops it",
        options.brokers,
        options.topic_prefix,
        options.partitions,
        broker.bootstrap_servers()
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(super::run::signal(shutdown.clone()));
    shutdown.cancelled().await;
    broker.stop();
    eprintln!("dev broker stopped");
    Ok(())
}
