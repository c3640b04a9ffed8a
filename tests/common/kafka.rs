//! The Kafka brokers of the tests.
//!
//! The real one: Apache Kafka (KRaft, one node), started once for the whole suite by
//! scripts/test.sh (scripts/kafka.sh) and found through `DWH_TEST_KAFKA_*`. Each test
//! takes topics under a prefix of its own and a consumer group of its own, so tests
//! that run at once never meet in a group. Without the broker the tests fail
//! rather than skip.
//!
//! librdkafka's mock cluster ([`mock_broker`]) stays for the faults a real broker
//! shared by the suite cannot be made to show: a broker taken down and brought back
//! up in the middle of a test.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dwh_helper::catalogue::Table;
use dwh_helper::kafka::devbroker::DevBrokerOptions;
use dwh_helper::kafka::DevBroker;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The real broker's PLAINTEXT listener (`DWH_TEST_KAFKA_BOOTSTRAP`).
pub fn kafka_bootstrap() -> String {
    kafka_var("DWH_TEST_KAFKA_BOOTSTRAP")
}

/// One of the variables scripts/kafka.sh exports; a missing one fails the test.
pub fn kafka_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh, which starts an Apache Kafka broker")
    })
}

/// A broker a test runs against.
#[allow(missing_debug_implementations)]
pub enum TestBroker {
    /// The suite's Apache Kafka broker.
    Kafka { bootstrap: String },
    /// An in-process mock cluster of the test's own (see the module comment).
    Mock(DevBroker),
}

impl TestBroker {
    /// The `bootstrap.servers` clients use.
    pub fn bootstrap_servers(&self) -> &str {
        match self {
            TestBroker::Kafka { bootstrap } => bootstrap,
            TestBroker::Mock(broker) => broker.bootstrap_servers(),
        }
    }

    /// Whether this is the real broker.
    pub fn is_real(&self) -> bool {
        matches!(self, TestBroker::Kafka { .. })
    }

    /// Takes the mock's broker `id` down or brings it up; the real broker is the
    /// whole suite's and cannot be.
    pub fn set_broker_up(&self, id: i32, up: bool) -> Result<(), dwh_helper::kafka::devbroker::DevBrokerError> {
        match self {
            TestBroker::Mock(broker) => broker.set_broker_up(id, up),
            TestBroker::Kafka { .. } => panic!("the suite's Kafka broker is shared: an outage test takes mock_broker"),
        }
    }
}

/// A prefix of topics (and, through [`group`], a consumer group) no other test uses,
/// in this process or another.
pub fn fresh_prefix() -> String {
    format!("t{}-{}.", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

/// The ingest consumer group of the test whose topics are under `prefix`.
pub fn group(prefix: &str) -> String {
    format!("{prefix}ingest-test")
}

/// The suite's Kafka broker with the seven topics, under a prefix of their own, of
/// `partitions` partitions each.
pub async fn broker(partitions: i32) -> (TestBroker, String) {
    broker_with(&Table::ALL.map(|t| (t, partitions))).await
}

/// The suite's Kafka broker with the given tables' topics (and no other) under a
/// prefix of their own.
pub async fn broker_with(topics: &[(Table, i32)]) -> (TestBroker, String) {
    let prefix = fresh_prefix();
    let bootstrap = kafka_bootstrap();
    create_topics(&bootstrap, &prefix, topics).await;
    (TestBroker::Kafka { bootstrap }, prefix)
}

/// Creates `topics` under `prefix` on the broker at `bootstrap` and waits until
/// every partition has a leader.
pub async fn create_topics(bootstrap: &str, prefix: &str, topics: &[(Table, i32)]) {
    let config = dwh_helper::config::Config::from_vars([("KAFKA_BOOTSTRAP_SERVERS".to_owned(), bootstrap.to_owned())])
        .expect("valid configuration");
    let mut by_count: std::collections::BTreeMap<i32, Vec<String>> = Default::default();
    for (table, partitions) in topics {
        by_count
            .entry(*partitions)
            .or_default()
            .push(dwh_helper::kafka::topic_name(prefix, *table));
    }
    for (partitions, names) in &by_count {
        dwh_helper::kafka::topics::create(&config.kafka, names, *partitions)
            .await
            .expect("topics created");
    }
    let kafka = config.kafka.clone();
    let expected: Vec<(String, usize)> = topics
        .iter()
        .map(|(t, p)| (dwh_helper::kafka::topic_name(prefix, *t), *p as usize))
        .collect();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer as _;
        let client: rdkafka::consumer::BaseConsumer = dwh_helper::kafka::client_config(&kafka, &[])
            .expect("client settings")
            .create()
            .expect("metadata client");
        // Partitions that have a leader, as a client's metadata shows them.
        let led = |topic: &str| -> Option<usize> {
            let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
            let found = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())?;
            Some(
                found
                    .partitions()
                    .iter()
                    .filter(|p| p.leader() >= 0 && p.error().is_none())
                    .count(),
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for (topic, partitions) in &expected {
            while led(topic) != Some(*partitions) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{topic} has no leader for each of its {partitions} partitions"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await
    .expect("metadata task");
}

/// A mock cluster of the test's own whose seven topics (under a prefix of their
/// own) have `partitions` partitions each. Only for a broker outage (see the
/// module comment).
pub async fn mock_broker(partitions: i32) -> (TestBroker, String) {
    let prefix = fresh_prefix();
    let broker = DevBroker::start(&DevBrokerOptions {
        partitions,
        topic_prefix: prefix.clone(),
        initial_rebalance_delay_ms: 100,
        ..DevBrokerOptions::default()
    })
    .await
    .expect("dev broker starts");
    (TestBroker::Mock(broker), prefix)
}

/// Runs one of Kafka's own command-line tools (a class of its jars, e.g.
/// `kafka.tools.DumpLogSegments`) with `args`, and returns its standard output; a
/// failure fails the test.
pub fn kafka_java(class: &str, args: &[&str]) -> String {
    let output = kafka_java_output(class, args);
    assert!(
        output.status.success(),
        "{class} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs one of Kafka's own command-line tools and returns how it ended.
pub fn kafka_java_output(class: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("java")
        .args([
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            &kafka_var("DWH_TEST_KAFKA_CLASSPATH"),
            class,
        ])
        .args(args)
        .output()
        .expect("java runs")
}

/// Runs one of Kafka's admin tools (e.g. `org.apache.kafka.tools.AclCommand`)
/// against the PLAINTEXT listener.
pub fn kafka_tool(class: &str, args: &[&str]) -> String {
    let bootstrap = kafka_bootstrap();
    let mut all = vec!["--bootstrap-server", bootstrap.as_str()];
    all.extend_from_slice(args);
    kafka_java(class, &all)
}

/// The user scripts/kafka.sh created with no permission of its own.
pub fn kafka_user() -> (String, String) {
    (kafka_var("DWH_TEST_KAFKA_USER"), kafka_var("DWH_TEST_KAFKA_PASSWORD"))
}

/// Grants (or with `add == false`, takes away) `operation` on the resources named
/// `prefix…` of `kind` (`topic`, `group`) to the test user.
pub fn acl(add: bool, operation: &str, kind: &str, prefix: &str) {
    let (user, _) = kafka_user();
    let principal = format!("User:{user}");
    let mut args = vec![
        if add { "--add" } else { "--remove" },
        "--allow-principal",
        &principal,
        "--operation",
        operation,
        "--resource-pattern-type",
        "prefixed",
    ];
    let flag = format!("--{kind}");
    args.extend([flag.as_str(), prefix]);
    if !add {
        args.push("--force");
    }
    kafka_tool("org.apache.kafka.tools.AclCommand", &args);
}

/// Deletes `topics` from the broker and waits for the answer.
pub async fn delete_topics(config: &dwh_helper::config::Config, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        dwh_helper::kafka::client_config(&config.kafka, &[])
            .expect("client settings")
            .create()
            .expect("admin client");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.delete_topics(&names, &options).await.expect("delete answered") {
        result.unwrap_or_else(|(topic, code)| panic!("cannot delete {topic}: {code}"));
    }
}

/// Raises `topic`'s partition count to `total`, on the broker.
pub async fn add_partitions(config: &dwh_helper::config::Config, topic: &str, total: usize) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        dwh_helper::kafka::client_config(&config.kafka, &[])
            .expect("client settings")
            .create()
            .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let raised = admin
        .create_partitions(&[NewPartitions::new(topic, total)], &options)
        .await
        .expect("create partitions answered");
    for result in raised {
        result.unwrap_or_else(|(topic, code)| panic!("cannot add partitions to {topic}: {code}"));
    }
}

/// Deletes the records of `topic`'s `partition` before `before`, as retention
/// would; returns the partition's low watermark after.
pub async fn expire_records(config: &dwh_helper::config::Config, topic: &str, partition: i32, before: i64) -> i64 {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        dwh_helper::kafka::client_config(&config.kafka, &[])
            .expect("client settings")
            .create()
            .expect("admin client");
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))
        .expect("an offset");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let done = admin
        .delete_records(&list, &options)
        .await
        .expect("delete records answered");
    let element = done.find_partition(topic, partition).expect("the partition answered");
    element
        .error()
        .unwrap_or_else(|e| panic!("cannot delete records of {topic}: {e}"));
    match element.offset() {
        rdkafka::Offset::Offset(low) => low,
        other => panic!("a low watermark, not {other:?}"),
    }
}
