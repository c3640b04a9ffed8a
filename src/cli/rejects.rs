//! `dwh-helper rejects`: the rejected records of a table, for operators.
//!
//! `list` shows them; `requeue` republishes their payloads, byte for byte with
//! their keys, onto the table's topic once the producer's bug is fixed, and
//! marks them requeued so that a second requeue sends nothing; `purge` deletes
//! old ones. The pipeline itself never deletes a reject.

use std::fmt::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand};

use crate::catalogue::Table;
use crate::config::Config;
use crate::kafka::{self, Publisher};
use crate::store::{Dwh, RejectFilter, StoredReject};
use crate::telemetry::events::{RejectsRequeued, RequeueRefused};
use crate::telemetry::Event as _;

/// Rejects requeued per round: published, acknowledged, then marked.
const REQUEUE_CHUNK: i64 = 1000;

#[derive(Debug, Subcommand)]
pub enum RejectsCommand {
    /// List a table's rejected records, oldest first
    List(ListArgs),
    /// Republish rejected payloads (byte for byte, with their keys) onto the table's topic, once the producer is fixed
    Requeue(RequeueArgs),
    /// Delete a table's rejected records older than a date
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
pub struct Which {
    /// The table whose rejects these are
    #[arg(long)]
    table: Table,
    /// Only rejects whose reason contains this text (case-insensitive)
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Only rejects of the last DURATION, e.g. 6h, 2d
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<std::time::Duration>,
}

impl Which {
    fn filter(&self) -> anyhow::Result<RejectFilter> {
        let since = match self.since {
            Some(d) => Some(Utc::now() - chrono::Duration::from_std(d).context("--since is too long")?),
            None => None,
        };
        Ok(RejectFilter {
            reason: self.reason.clone(),
            since,
            ..RejectFilter::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    which: Which,
    /// Only those not requeued yet
    #[arg(long)]
    pending: bool,
    /// At most this many
    #[arg(long, default_value_t = 100)]
    limit: i64,
    /// JSON lines (payload and key as text) instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RequeueArgs {
    #[command(flatten)]
    which: Which,
    /// Count and list what would be sent; send nothing
    #[arg(long)]
    dry_run: bool,
    /// Send again those the producer refused on an earlier requeue (too large
    /// for the topic, say), once the cause is fixed
    #[arg(long)]
    retry_refused: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// The table whose rejects are deleted
    #[arg(long)]
    table: Table,
    /// Delete those rejected before this date (YYYY-MM-DD, UTC) or time (RFC 3339)
    #[arg(long, value_name = "DATE", value_parser = parse_before)]
    before: DateTime<Utc>,
}

fn parse_before(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("expected YYYY-MM-DD or an RFC 3339 time, got {text:?}"))
}

pub async fn rejects(config: Config, command: RejectsCommand) -> anyhow::Result<()> {
    let dwh = Dwh::connect(&config.dwh)?;
    match command {
        RejectsCommand::List(args) => list(&dwh, args).await,
        RejectsCommand::Requeue(args) => requeue(&config, &dwh, args).await,
        RejectsCommand::Purge(args) => {
            let deleted = dwh.purge_rejects(args.table, args.before).await?;
            println!(
                "purged {deleted} reject(s) of {} rejected before {}",
                args.table,
                args.before.to_rfc3339()
            );
            Ok(())
        }
    }
}

async fn list(dwh: &Dwh, args: ListArgs) -> anyhow::Result<()> {
    let mut filter = args.which.filter()?;
    filter.pending_only = args.pending;
    filter.limit = Some(args.limit);
    let rejects = dwh.rejects(args.which.table, &filter).await?;
    if args.json {
        for r in &rejects {
            println!("{}", json_line(r));
        }
        return Ok(());
    }
    print!("{}", render(&rejects));
    if rejects.len() as i64 == args.limit {
        println!("(the first {} shown: --limit shows more)", args.limit);
    }
    Ok(())
}

async fn requeue(config: &Config, dwh: &Dwh, args: RequeueArgs) -> anyhow::Result<()> {
    let table = args.which.table;
    let mut filter = args.which.filter()?;
    filter.pending_only = true;
    filter.retry_refused = args.retry_refused;
    filter.limit = Some(REQUEUE_CHUNK);
    // Records rejected again while this runs get new ids: they are not taken.
    filter.max_id = Some(dwh.last_reject_id().await?);
    let first = dwh.rejects(table, &filter).await?;
    let Some(last) = first.last() else {
        println!("nothing to requeue: no reject of {table} matches that is not requeued already");
        return Ok(());
    };
    if args.dry_run {
        let mut all = first.clone();
        filter.after_id = last.id;
        filter.limit = None;
        all.extend(dwh.rejects(table, &filter).await?);
        print!("{}", render(&all));
        println!(
            "dry run: {} reject(s) of {table} would be requeued; nothing sent",
            all.len()
        );
        return Ok(());
    }
    let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
    let publisher = Publisher::new(&config.kafka)?;
    let (mut sent, mut marked, mut refused) = (0u64, 0u64, 0u64);
    let mut chunk = first;
    loop {
        let mut batch = publisher.batch();
        let mut failure = None;
        for r in &chunk {
            if let Err(e) = batch.send_tagged(r.id, &topic, r.key.as_deref(), &r.payload).await {
                failure = Some(e);
                break;
            }
        }
        let settled = match batch.finish_tagged().await {
            Ok(settled) => settled,
            Err((settled, e)) => {
                failure.get_or_insert(e);
                settled
            }
        };
        // Marked once the broker acknowledged them: a crash in between sends
        // them again next time, which natural keys make harmless.
        sent += settled.acknowledged.len() as u64;
        marked += dwh.mark_requeued(&settled.acknowledged).await?;
        // A record refused for what it is (too large for the topic, say) is
        // marked with why and passed: never sent again by this run, nor by the
        // next unless --retry-refused.
        for (id, why) in &settled.refused {
            dwh.mark_requeue_refused(*id, &why.to_string()).await?;
            RequeueRefused {
                table,
                id: *id,
                reason: why,
            }
            .emit();
            refused += 1;
        }
        if let Some(e) = failure {
            anyhow::bail!(
                "requeue of {table} stopped: {e}; {sent} sent and marked, {refused} refused; \
                 run it again to send the rest"
            );
        }
        filter.after_id = chunk.last().expect("chunks are not empty").id;
        chunk = dwh.rejects(table, &filter).await?;
        if chunk.is_empty() {
            break;
        }
    }
    RejectsRequeued {
        table,
        topic: &topic,
        sent,
        marked,
        refused,
    }
    .emit();
    println!("requeued {sent} reject(s) of {table} onto {topic}; {marked} marked requeued; {refused} refused by the producer");
    Ok(())
}

fn json_line(r: &StoredReject) -> serde_json::Value {
    let mut value = serde_json::to_value(r).expect("a reject serializes");
    value["key"] = r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()).into();
    value["payload"] = String::from_utf8_lossy(&r.payload).into();
    value
}

fn render(rejects: &[StoredReject]) -> String {
    let mut out = format!(
        "{:>8} {:>9} {:>10} {:<24} {:<24} {:<40} PAYLOAD\n",
        "ID", "PARTITION", "OFFSET", "REJECTED AT", "REQUEUED AT", "REASON"
    );
    for r in rejects {
        let _ = writeln!(
            out,
            "{:>8} {:>9} {:>10} {:<24} {:<24} {:<40} {}",
            r.id,
            r.partition,
            r.offset,
            r.rejected_at.format("%Y-%m-%d %H:%M:%S"),
            match (&r.requeued_at, &r.requeue_error) {
                (Some(t), _) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
                // Why is in --json (`requeue_error`).
                (None, Some(_)) => "refused by producer".into(),
                (None, None) => "-".into(),
            },
            shorten(&r.reason, 40),
            shorten(&String::from_utf8_lossy(&r.payload), 60),
        );
    }
    let _ = writeln!(out, "{} reject(s)", rejects.len());
    out
}

fn shorten(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    match one_line.char_indices().nth(max.saturating_sub(1)) {
        Some((cut, _)) if one_line.chars().count() > max => format!("{}…", &one_line[..cut]),
        _ => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_takes_a_date_or_a_time() {
        assert_eq!(
            parse_before("2026-11-01").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_before("2026-11-01T12:30:00+02:00").unwrap().to_rfc3339(),
            "2026-11-01T10:30:00+00:00"
        );
        assert!(parse_before("yesterday").unwrap_err().contains("YYYY-MM-DD"));
    }

    #[test]
    fn long_text_is_cut_on_one_line() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdefghijkl", 5), "abcd…");
        assert_eq!(shorten("ééééééé", 3), "éé…");
    }
}
