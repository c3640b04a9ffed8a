//! `dwh-helper replay`: rewind (or move forward) where tables' ingest reads, in
//! the DWH's offset rows, with the scenarios of `kafka-consumer-groups
//! --reset-offsets`. Prints the plan; `--execute` applies it in one DWH
//! transaction, records it in `dwh_replays`, then mirrors the offsets into
//! Kafka's committed offsets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args};

use crate::catalogue::Table;
use crate::config::{Config, OffsetReset};
use crate::kafka::{self, groups, topics::Metadata};
use crate::replay::{self, Position, Scenario, Step};
use crate::store::{Dwh, TopicIdentity};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("scenario").required(true).multiple(false)))]
pub struct ReplayArgs {
    /// A table to move (repeatable)
    #[arg(long, required_unless_present_any = ["all_tables", "from_file"])]
    table: Vec<Table>,
    /// Every table
    #[arg(long, conflicts_with = "table")]
    all_tables: bool,
    /// Only these partitions, e.g. 0,3
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<i32>,
    /// The consumer group whose offsets move [default: KAFKA_GROUP_ID]
    #[arg(long)]
    group: Option<String>,
    /// To the first offset the broker still holds
    #[arg(long, group = "scenario")]
    to_earliest: bool,
    /// To the end of the log: skip everything not read yet
    #[arg(long, group = "scenario")]
    to_latest: bool,
    /// To this offset in every partition in scope
    #[arg(long, group = "scenario", value_name = "N")]
    to_offset: Option<i64>,
    /// By this many records from where ingest reads now (negative: back)
    #[arg(long, group = "scenario", value_name = "±N", allow_negative_numbers = true)]
    shift_by: Option<i64>,
    /// To the first record at or after this time (RFC 3339)
    #[arg(long, group = "scenario", value_name = "TIME")]
    to_datetime: Option<DateTime<Utc>>,
    /// To the first record at or after this long ago, e.g. 6h, 2d, 30m
    #[arg(long, group = "scenario", value_name = "DURATION", value_parser = humantime::parse_duration)]
    by_duration: Option<std::time::Duration>,
    /// To the offsets of a plan file (topic,partition,offset per line, as --export writes)
    #[arg(long, group = "scenario", value_name = "FILE")]
    from_file: Option<PathBuf>,
    /// Move the offsets to the topic the broker has now, when it is another log
    /// than the one the DWH's offsets count (deleted and created again, or the
    /// cluster replaced): its old offsets are dropped; the plan counts from
    /// the new log (every partition)
    #[arg(long, conflicts_with = "partitions")]
    adopt_topic: bool,
    /// Apply the plan (without it, only print it)
    #[arg(long)]
    execute: bool,
    /// Write the plan to this file (the format --from-file reads)
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
}

impl ReplayArgs {
    /// The scenario, and how it was given (recorded with the replay).
    fn scenario(&self) -> anyhow::Result<(Scenario, String)> {
        Ok(if self.to_earliest {
            (Scenario::ToEarliest, "--to-earliest".into())
        } else if self.to_latest {
            (Scenario::ToLatest, "--to-latest".into())
        } else if let Some(n) = self.to_offset {
            if n < 0 {
                bail!("--to-offset must be 0 or more, not {n}");
            }
            (Scenario::ToOffset(n), format!("--to-offset {n}"))
        } else if let Some(n) = self.shift_by {
            (Scenario::ShiftBy(n), format!("--shift-by {n}"))
        } else if let Some(at) = self.to_datetime {
            (Scenario::ToDatetime(at), format!("--to-datetime {}", at.to_rfc3339()))
        } else if let Some(ago) = self.by_duration {
            let at = Utc::now() - chrono::Duration::from_std(ago).context("--by-duration is too long")?;
            (
                Scenario::ToDatetime(at),
                format!(
                    "--by-duration {} ({})",
                    humantime::format_duration(ago),
                    at.to_rfc3339()
                ),
            )
        } else if let Some(path) = &self.from_file {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let offsets = replay::parse_plan_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (Scenario::FromFile(offsets), format!("--from-file {}", path.display()))
        } else {
            unreachable!("clap requires one scenario")
        })
    }
}

pub async fn replay(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    let (scenario, described) = args.scenario()?;
    let group = args.group.clone().unwrap_or_else(|| config.kafka.group_id.clone());
    let prefix = &config.kafka.topic_prefix;
    let tables: Vec<Table> = match &scenario {
        _ if args.all_tables => Table::ALL.to_vec(),
        Scenario::FromFile(offsets) if args.table.is_empty() => {
            let mut tables = Vec::new();
            for (topic, _) in offsets.keys() {
                let table = kafka::table_of_topic(prefix, topic)
                    .with_context(|| format!("the plan file names {topic}, which is not a table's topic"))?;
                if !tables.contains(&table) {
                    tables.push(table);
                }
            }
            tables.sort();
            tables
        }
        _ => args.table.clone(),
    };
    let dwh = Dwh::connect(&config.dwh)?;
    let asked = Asked {
        group: &group,
        tables: &tables,
        partitions: &args.partitions,
        scenario: &scenario,
        adopt: args.adopt_topic,
    };
    let (steps, adopt) = plan(&config, &dwh, asked).await?;
    for (topic, log) in &adopt {
        println!("{topic}: the offsets move to {log}; those of the old topic are dropped");
    }
    let described = if adopt.is_empty() {
        described
    } else {
        let logs: Vec<String> = adopt.iter().map(|(topic, log)| format!("{topic}: {log}")).collect();
        format!("{described} --adopt-topic ({})", logs.join("; "))
    };
    for warning in steps.iter().flat_map(|s| &s.warnings) {
        eprintln!("warning: {warning}");
    }
    print!("{}", replay::render(&steps));
    if let Some(path) = &args.export {
        std::fs::write(path, replay::plan_file(&steps)).with_context(|| format!("cannot write {}", path.display()))?;
        println!("plan written to {}", path.display());
    }
    if !args.execute {
        println!("nothing changed: run again with --execute to apply this plan");
        return Ok(());
    }
    let planned: Vec<_> = steps.iter().map(Step::planned).collect();
    // Kafka's committed offsets only mirror the DWH, for Kafka's own lag tools.
    let mirror: Vec<_> = planned.iter().map(|p| (p.topic.clone(), p.partition, p.new)).collect();
    refuse_while_ingested(&dwh, &group, &steps).await?;
    if let Some(state) = settled(&config, &group).await? {
        refuse_while_read(&state, &steps)?;
    }
    let by = executed_by();
    let id = dwh.execute_replay(&group, &by, &described, &planned, &adopt).await?;
    tracing::info!(target: "dwh_helper::replay", id, group, by, scenario = described, partitions = planned.len(), "replay executed");
    println!(
        "replay {id} executed: {} partition(s) of group {group} moved",
        planned.len()
    );
    match commit(&config, &group, mirror).await {
        Ok(()) => println!("Kafka's committed offsets of {group} mirror the new positions"),
        // librdkafka's mock cluster refuses commits from outside a group it knows.
        Err(e) => eprintln!(
            "warning: the DWH holds the new offsets (ingest reads from them), but Kafka's committed \
             offsets of {group} were not updated: {e:#}; they catch up at the next batch"
        ),
    }
    Ok(())
}

async fn describe(config: &Config, group: &str) -> anyhow::Result<Option<groups::GroupState>> {
    let (kafka_config, name) = (config.kafka.clone(), group.to_owned());
    tokio::task::spawn_blocking(move || groups::describe(&kafka_config, &name))
        .await?
        .with_context(|| format!("cannot describe consumer group {group}"))
}

/// How long a group in the middle of a rebalance is given to settle: a member
/// that closed while it was rejoining is only dropped at the end of its session
/// (librdkafka's default `session.timeout.ms` is 45 s).
const SETTLE_WAIT: Duration = Duration::from_secs(60);

/// The group once it is not rebalancing, or as it stands after [`SETTLE_WAIT`]:
/// members of instances that were just stopped leave, or are dropped, while it
/// rebalances; members that still read rejoin and are refused by the caller.
async fn settled(config: &Config, group: &str) -> anyhow::Result<Option<groups::GroupState>> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    let mut told = false;
    loop {
        let state = describe(config, group).await?;
        let rebalancing = state.as_ref().is_some_and(|s| s.rebalancing() && !s.members.is_empty());
        if !rebalancing || tokio::time::Instant::now() >= deadline {
            return Ok(state);
        }
        if !told {
            told = true;
            eprintln!(
                "consumer group {group} is rebalancing: waiting up to {} s for it to settle",
                SETTLE_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn commit(config: &Config, group: &str, offsets: Vec<(String, i32, i64)>) -> anyhow::Result<()> {
    let (kafka_config, name) = (config.kafka.clone(), group.to_owned());
    Ok(tokio::task::spawn_blocking(move || groups::commit(&kafka_config, &name, &offsets)).await??)
}

/// What the operator asked a plan of.
#[derive(Debug, Clone, Copy)]
struct Asked<'a> {
    group: &'a str,
    tables: &'a [Table],
    /// Only these partitions, when given.
    partitions: &'a [i32],
    scenario: &'a Scenario,
    /// `--adopt-topic`.
    adopt: bool,
}

/// The plan for the tables asked, and the topics whose offsets move to a new
/// log, with it.
async fn plan(
    config: &Config,
    dwh: &Dwh,
    asked: Asked<'_>,
) -> anyhow::Result<(Vec<Step>, Vec<(String, TopicIdentity)>)> {
    let Asked {
        group,
        tables,
        partitions,
        scenario,
        adopt,
    } = asked;
    let prefix = config.kafka.topic_prefix.clone();
    let topics: Vec<String> = tables.iter().map(|&t| kafka::topic_name(&prefix, t)).collect();
    let kafka_config = config.kafka.clone();
    let at = match scenario {
        Scenario::ToDatetime(at) => Some(at.timestamp_millis()),
        _ => None,
    };
    let wanted = topics.clone();
    let partitions_wanted = partitions.to_vec();
    // Watermarks, the topics' ids, and for a time the broker's offsets by timestamp.
    let (marks, logs, by_time) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let metadata = Metadata::connect(&kafka_config)?;
        let marks = metadata
            .watermarks_of(&wanted)
            .context("cannot read the topics' watermarks")?;
        let (ids, cluster_id) = metadata
            .identities(&wanted)
            .map_err(|e| anyhow::anyhow!("cannot read the topics' ids: {e}"))?;
        let logs: HashMap<String, TopicIdentity> = ids
            .into_iter()
            .map(|(topic, topic_id)| {
                let cluster_id = cluster_id.clone();
                (topic, TopicIdentity { topic_id, cluster_id })
            })
            .collect();
        let mut by_time = HashMap::new();
        if let Some(millis) = at {
            for (topic, list) in &marks {
                let ps: Vec<i32> = list
                    .iter()
                    .map(|w| w.partition)
                    .filter(|p| partitions_wanted.is_empty() || partitions_wanted.contains(p))
                    .collect();
                let answer = metadata
                    .offsets_at(topic, &ps, millis)
                    .with_context(|| format!("cannot look up offsets by time in {topic}"))?;
                by_time.insert(topic.clone(), answer);
            }
        }
        Ok((marks, logs, by_time))
    })
    .await??;
    let mut steps = Vec::new();
    let mut adopted = Vec::new();
    for (&table, topic) in tables.iter().zip(&topics) {
        let Some(list) = marks.get(topic) else {
            bail!("topic {topic} of table {table} does not exist on the broker");
        };
        for &p in partitions {
            if !list.iter().any(|w| w.partition == p) {
                bail!("{topic} has no partition {p} (it has {})", list.len());
            }
        }
        let log = logs.get(topic);
        let stored_logs = dwh.topic_identities(group, topic).await?;
        let adopting = replay::adopts(topic, &stored_logs, log, adopt).map_err(anyhow::Error::msg)?;
        // The offsets of another log count nothing in this one.
        let stored = if adopting {
            adopted.push((topic.clone(), log.cloned().expect("adopting a log the broker named")));
            HashMap::new()
        } else {
            dwh.topic_offsets(group, topic).await?
        };
        for w in list {
            if !partitions.is_empty() && !partitions.contains(&w.partition) {
                continue;
            }
            let position = Position {
                table,
                topic: topic.clone(),
                partition: w.partition,
                low: w.low,
                high: w.high,
                current: stored.get(&w.partition).copied(),
                start: match config.kafka.auto_offset_reset {
                    OffsetReset::Earliest => w.low,
                    OffsetReset::Latest => w.high,
                },
                log: log.cloned(),
            };
            let answer = by_time.get(topic).and_then(|m| m.get(&w.partition)).copied();
            if let Some(step) = replay::step(scenario, position, answer).map_err(anyhow::Error::msg)? {
                steps.push(step);
            }
        }
    }
    if let Scenario::FromFile(offsets) = scenario {
        for (topic, partition) in offsets.keys() {
            if !steps
                .iter()
                .any(|s| &s.position.topic == topic && s.position.partition == *partition)
            {
                bail!("the plan file names {topic} partition {partition}, which is not in scope or not on the broker");
            }
        }
    }
    Ok((steps, adopted))
}

/// Refuses while an ingest instance announced, lately, that it reads a table of
/// the plan (any broker; `dwh_ingest_members`).
async fn refuse_while_ingested(dwh: &Dwh, group: &str, steps: &[Step]) -> anyhow::Result<()> {
    let readers: Vec<String> = dwh
        .readers(group, crate::ingest::ANNOUNCE_FRESH)
        .await?
        .into_iter()
        .filter(|r| steps.iter().any(|s| s.position.table.name() == r.table))
        .map(|r| {
            let age = (Utc::now() - r.seen_at).num_seconds().max(0);
            format!("{} by {} (seen {age} s ago)", r.table, r.member)
        })
        .collect();
    if !readers.is_empty() {
        bail!(
            "group {group} is ingesting {}: stop those instances (SIGTERM), or restart them with the table \
             left out of KAFKA_INGEST_TABLES, then run replay again (an instance that crashed stops counting \
             {} s after it was last seen); nothing was changed",
            readers.join(", "),
            crate::ingest::ANNOUNCE_FRESH.as_secs()
        );
    }
    Ok(())
}

/// Refuses while a member of `group` reads a topic of the plan: its batches in
/// flight would be fenced, and its Kafka commits would overwrite the mirror.
fn refuse_while_read(state: &groups::GroupState, steps: &[Step]) -> anyhow::Result<()> {
    let mut topics: Vec<&str> = steps.iter().map(|s| s.position.topic.as_str()).collect();
    topics.dedup();
    let readers: Vec<String> = state
        .members
        .iter()
        .filter(|m| topics.iter().any(|t| m.reads(t)))
        .map(|m| format!("{} on {}", m.client_id, m.host))
        .collect();
    if !readers.is_empty() {
        bail!(
            "consumer group {} is {} with {} active member(s) reading {} ({}): stop those instances \
             (SIGTERM), or restart them with the table left out of KAFKA_INGEST_TABLES, then run replay again; \
             nothing was changed",
            state.group,
            state.state,
            readers.len(),
            topics.join(", "),
            readers.join("; ")
        );
    }
    Ok(())
}

/// Who ran the replay: the user and the host, as the environment tells them.
fn executed_by() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", crate::telemetry::host_name())
}
