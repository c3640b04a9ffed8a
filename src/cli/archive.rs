//! `dwh-helper archive restore|verify`: read the S3 archive back.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _};

use anyhow::{bail, Context as _};
use chrono::NaiveDate;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::archive::format::{self, Line, Span};
use crate::catalogue::Table;
use crate::config::Config;
use crate::kafka::{self, Publisher};
use crate::s3::S3;

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    #[command(subcommand)]
    command: ArchiveCommand,
}

#[derive(Debug, Subcommand)]
enum ArchiveCommand {
    /// Republish a table's archived records onto its topic (idempotent downstream: natural keys)
    Restore {
        #[arg(long)]
        table: Table,
        /// First day (dt=) to restore, inclusive
        #[arg(long)]
        from: Option<NaiveDate>,
        /// Last day (dt=) to restore, inclusive
        #[arg(long)]
        to: Option<NaiveDate>,
    },
    /// Report offset gaps or overlaps between a table's archived objects (exit 1 if any)
    Verify {
        #[arg(long)]
        table: Table,
        /// Print one JSON object instead of lines
        #[arg(long)]
        json: bool,
    },
}

pub async fn archive(config: Config, args: ArchiveArgs) -> anyhow::Result<()> {
    if !config.s3.is_configured() {
        bail!("no object store configured (set S3_ENDPOINT_URL or S3_ACCESS_KEY_ID)");
    }
    let s3 = S3::new(&config.s3);
    match args.command {
        ArchiveCommand::Restore { table, from, to } => restore(&config, &s3, table, from, to).await,
        ArchiveCommand::Verify { table, json } => verify(&config, &s3, table, json).await,
    }
}

/// A table's archived objects, by (topic, partition), in offset order.
async fn objects(
    config: &Config,
    s3: &S3,
    table: Table,
) -> anyhow::Result<BTreeMap<(String, i32), Vec<(format::ArchivedKey, String)>>> {
    let prefix = format::table_prefix(&config.s3.archive_prefix, table.name());
    let mut by_partition: BTreeMap<(String, i32), Vec<(format::ArchivedKey, String)>> = BTreeMap::new();
    for object in s3.list_all(&prefix).await? {
        if let Some(parsed) = format::parse_key(&prefix, &object.key) {
            by_partition
                .entry((parsed.topic.clone(), parsed.partition))
                .or_default()
                .push((parsed, object.key));
        }
    }
    for list in by_partition.values_mut() {
        list.sort_by_key(|(k, _)| k.first_offset);
    }
    Ok(by_partition)
}

async fn verify(config: &Config, s3: &S3, table: Table, as_json: bool) -> anyhow::Result<()> {
    let mut report = Vec::new();
    let mut problems_total = 0;
    for ((topic, partition), list) in objects(config, s3, table).await? {
        let mut spans = Vec::with_capacity(list.len());
        for (parsed, key) in &list {
            let info = s3.object_info(key).await?;
            let last: i64 = info
                .metadata
                .get("last-offset")
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{key} has no last-offset metadata"))?;
            spans.push(Span {
                key: key.clone(),
                first: parsed.first_offset,
                last,
            });
        }
        let start = spans.iter().map(|s| s.first).min().unwrap_or(0);
        let end = spans.iter().map(|s| s.last + 1).max().unwrap_or(0);
        let problems = format::check(spans, start);
        problems_total += problems.len();
        report.push((topic, partition, list.len(), start, end, problems));
    }
    if as_json {
        let partitions: Vec<_> = report
            .iter()
            .map(|(topic, partition, objects, start, end, problems)| {
                json!({
                    "topic": topic, "partition": partition, "objects": objects,
                    "first_offset": start, "end_offset": end,
                    "problems": problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "table": table.name(), "partitions": partitions, "problems": problems_total })
        );
    } else {
        for (topic, partition, objects, start, end, problems) in &report {
            println!("{topic}[{partition}]: {objects} objects, offsets {start}..{end}");
            for problem in problems {
                println!("  {problem}");
            }
        }
        if report.is_empty() {
            println!("no archived objects for {table}");
        }
    }
    if problems_total > 0 {
        bail!("{problems_total} problem(s) in the archive of {table}");
    }
    if !as_json {
        println!("archive of {table} is consistent: no gap, no overlap");
    }
    Ok(())
}

/// What an archive object may weigh when restored.
struct RestoreLimits {
    /// Decompressed (and stored) bytes of one object: the archive closes an object
    /// at S3_ARCHIVE_MAX_BYTES, plus the record that crossed it.
    object_bytes: u64,
    /// One JSON line: a record as large as the DWH takes, base64-encoded, and more.
    line_bytes: u64,
}

impl RestoreLimits {
    fn of(config: &Config) -> RestoreLimits {
        let record = config.dwh.max_write_batch_bytes as u64;
        let line_bytes = record * 2 + 64 * 1024;
        RestoreLimits {
            object_bytes: config.s3.archive_max_bytes as u64 + line_bytes,
            line_bytes,
        }
    }
}

async fn restore(
    config: &Config,
    s3: &S3,
    table: Table,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> anyhow::Result<()> {
    let selected: Vec<(format::ArchivedKey, String)> = objects(config, s3, table)
        .await?
        .into_values()
        .flatten()
        .filter(|(k, _)| from.is_none_or(|f| k.date >= f) && to.is_none_or(|t| k.date <= t))
        .collect();
    // Every object is checked before anything is published: one the archive role
    // did not write (no metadata, or too large to be its) stops the restore.
    let limits = RestoreLimits::of(config);
    let mut refused = Vec::new();
    for (_, key) in &selected {
        let info = s3.object_info(key).await?;
        let has_metadata = ["first-offset", "last-offset", "records"]
            .iter()
            .all(|m| info.metadata.get(*m).is_some_and(|v| v.parse::<i64>().is_ok()));
        if !has_metadata {
            refused.push(format!(
                "{key} (no archive metadata: first-offset, last-offset, records)"
            ));
        } else if info.size > limits.object_bytes {
            refused.push(format!(
                "{key} ({} bytes, over {} for an archive object)",
                info.size, limits.object_bytes
            ));
        }
    }
    if !refused.is_empty() {
        bail!(
            "refusing to restore: {} object(s) under the archive prefix are not the archive role's:\n  {}",
            refused.len(),
            refused.join("\n  ")
        );
    }
    let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
    let publisher = Publisher::new(&config.kafka)?;
    let progress =
        indicatif::ProgressBar::with_draw_target(Some(selected.len() as u64), indicatif::ProgressDrawTarget::stderr());
    let mut batch = publisher.batch();
    for (_, key) in &selected {
        let data = s3.get_bytes(key).await?;
        // Decompressed bytes and each line are bounded (a gzip bomb stops at the cap).
        let mut reader = BufReader::new(flate2::read::GzDecoder::new(&data[..]).take(limits.object_bytes + 1));
        let mut line = Vec::new();
        let mut total = 0u64;
        for number in 1.. {
            line.clear();
            let read = (&mut reader)
                .take(limits.line_bytes + 1)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("{key}: cannot decompress"))?;
            if read == 0 {
                break;
            }
            total += read as u64;
            if total > limits.object_bytes {
                bail!(
                    "{key}: decompresses to over {} bytes; not an archive object",
                    limits.object_bytes
                );
            }
            if line.len() as u64 > limits.line_bytes {
                bail!(
                    "{key}: line {number} is over {} bytes; not an archive line",
                    limits.line_bytes
                );
            }
            let record: Line = serde_json::from_slice(&line).with_context(|| format!("{key}: line {number}"))?;
            let value = record.value_bytes().map_err(anyhow::Error::msg)?.unwrap_or_default();
            let record_key = record.key_bytes().map_err(anyhow::Error::msg)?.unwrap_or_default();
            batch.send(&topic, &record_key, &value).await?;
        }
        progress.inc(1);
    }
    let published = batch.finish().await?;
    progress.finish_and_clear();
    println!(
        "republished {published} records from {} objects to {topic}",
        selected.len()
    );
    Ok(())
}
