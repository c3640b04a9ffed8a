//! Where everything stands, from the sources of truth: the offsets stored in the
//! DWH and the broker's watermarks (Kafka's committed offsets only mirror the
//! DWH, so group-lag tools cannot see this lag). Serves `dwh-helper status`,
//! `GET /status` and the lag loop of [`super::lag`].
//!
//! Verdict: `failing` when the DWH or the broker does not answer, a table's
//! writes fail, or a stored offset does not fit the log; else `stalled` when a
//! partition is stalled ([`super::stall`]: records older than
//! `KAFKA_STALL_AFTER_SECONDS` wait, and nothing landed in that time); else
//! `lagging` when any partition has records not yet in the DWH; else
//! `caught_up`.

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalogue::Table;
use crate::config::Config;
use crate::ingest::IngestStatus;
use crate::kafka::{self, topics};
use crate::store::{Dwh, OtherGroup, RejectCounts, ReplayRecord, StoredGap, StoredOffset};

/// One partition's range on the broker: `(low, high)`.
pub type Range = (i64, i64);

/// Offsets read from the broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerView {
    /// Watermarks by topic, then partition (a missing topic has none).
    pub watermarks: HashMap<String, Vec<(i32, Range)>>,
    /// The first offset of each partition whose record is at most
    /// `KAFKA_STALL_AFTER_SECONDS` old (`None`: every record is older), for
    /// the partitions that hold records; read only when asked ([`Stalls`]).
    pub fresh_from: HashMap<(String, i32), Option<i64>>,
    /// The archive group's committed offsets, when asked for.
    pub archived: HashMap<(String, i32), i64>,
    /// Each topic's id (KIP-516), read with the offsets by time; a topic
    /// without one, or a failed query, is missing (no check).
    pub topic_ids: HashMap<String, String>,
    /// Why the topic ids could not be read, if they could not: the offsets are
    /// then checked against the watermarks alone, and the report says so.
    pub topic_ids_error: Option<String>,
}

/// Whether [`read_broker`] also asks the broker for its offsets by time, which
/// `status`'s reading of a stall needs (one more request per topic); the lag
/// loop's watchdog keeps its own clock and does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalls {
    Read,
    Skip,
}

/// Reads the watermarks of the seven topics, with `stalls` the offsets by
/// time, and with `archive_group` that group's committed offsets. Blocking:
/// call from `spawn_blocking`.
pub fn read_broker(config: &Config, archive_group: Option<&str>, stalls: Stalls) -> Result<BrokerView, String> {
    let kafka = &config.kafka;
    let metadata = topics::Metadata::connect(kafka).map_err(|e| e.to_string())?;
    let names: Vec<String> = Table::ALL
        .iter()
        .map(|t| kafka::topic_name(&kafka.topic_prefix, *t))
        .collect();
    let marks = metadata
        .watermarks_of(&names)
        .map_err(|e| format!("broker unreachable: {e}"))?;
    let mut view = BrokerView {
        watermarks: marks
            .into_iter()
            .map(|(topic, marks)| (topic, marks.iter().map(|w| (w.partition, (w.low, w.high))).collect()))
            .collect(),
        ..BrokerView::default()
    };
    if stalls == Stalls::Read {
        // A failed query leaves the offsets to the watermarks' check alone,
        // and the report says so.
        match metadata.identities(&names) {
            Ok((ids, _)) => view.topic_ids = ids,
            Err(e) => view.topic_ids_error = Some(e),
        }
    }
    let window = chrono::Duration::from_std(kafka.stall_after).unwrap_or(chrono::Duration::MAX);
    let since = (Utc::now() - window).timestamp_millis();
    for (topic, marks) in view.watermarks.iter().filter(|_| stalls == Stalls::Read) {
        let holding: Vec<i32> = marks.iter().filter(|(_, (l, h))| h > l).map(|(p, _)| *p).collect();
        if holding.is_empty() {
            continue;
        }
        let answer = metadata
            .offsets_at(topic, &holding, since)
            .map_err(|e| format!("broker unreachable: {e}"))?;
        for (partition, offset) in answer {
            let fresh = match offset {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            };
            view.fresh_from.insert((topic.clone(), partition), fresh);
        }
    }
    if let Some(group) = archive_group {
        let partitions: Vec<(String, Vec<i32>)> = view
            .watermarks
            .iter()
            .map(|(t, ps)| (t.clone(), ps.iter().map(|(p, _)| *p).collect()))
            .collect();
        view.archived = topics::committed(kafka, group, &partitions).map_err(|e| format!("archive group: {e}"))?;
    }
    Ok(view)
}

/// Records of a partition not yet in the DWH: everything from the stored offset
/// (from the first record held when nothing is stored) to the high watermark.
pub fn lag(stored: Option<i64>, (low, high): Range) -> i64 {
    (high - stored.unwrap_or(low).max(low)).max(0)
}

/// Why one partition is stalled ([`super::stall`]), if it is.
pub fn stalled(
    stored: Option<&StoredOffset>,
    range: Range,
    fresh_from: Option<&Option<i64>>,
    config: &Config,
) -> Option<String> {
    // Without the broker's answer by time (a partition with no record), there
    // is nothing waiting to be old.
    let fresh_from = *fresh_from?;
    let partition = super::stall::Partition {
        stored: stored.map(|o| (o.next_offset, o.updated_at)),
        range,
        fresh_from,
    };
    super::stall::stalled(&partition, Utc::now(), config.kafka.stall_after.as_secs())
}

/// Why a stored offset cannot be read from, if it cannot: it counts in
/// another log than the broker's topic (`logs`: the stored and the broker's
/// topic ids, when known), or it lies outside the log.
fn misfit(stored: Option<i64>, (low, high): Range, logs: (Option<&str>, Option<&str>)) -> Option<String> {
    if let (Some(kept), Some(found)) = logs {
        if kept != found {
            return Some(format!(
                "stored offset {} counts in topic id {kept}, but the broker's topic is topic id {found} (created \
                 again): adopt it with dwh-helper replay --adopt-topic",
                stored.unwrap_or_default()
            ));
        }
    }
    match stored {
        Some(s) if s > high => Some(format!("stored offset {s} is past the end of the log ({high})")),
        Some(s) if s < low => Some(format!(
            "stored offset {s} is below the first record held ({low}): records {s}..{low} are gone"
        )),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    CaughtUp,
    Lagging,
    /// Records wait that nothing moves ([`super::stall`]).
    Stalled,
    Failing,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Verdict {
    pub state: State,
    /// One line for a person.
    pub summary: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartitionReport {
    pub partition: i32,
    /// The next offset stored in the DWH, if any.
    pub stored: Option<i64>,
    pub low: i64,
    pub high: i64,
    pub lag: i64,
    pub problem: Option<String>,
    /// Why the partition is stalled, if it is.
    pub stalled: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TableReport {
    #[schema(value_type = String)]
    pub table: Table,
    pub topic: String,
    pub rows: Option<i64>,
    pub rejects: Option<RejectCounts>,
    pub last_batch_at: Option<DateTime<Utc>>,
    pub lag: i64,
    /// Why this instance's writes of the table fail (`GET /status` only).
    pub failing: Option<String>,
    pub partitions: Vec<PartitionReport>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ArchivePartition {
    #[schema(value_type = String)]
    pub table: Table,
    pub partition: i32,
    /// The archive group's committed offset: everything before it is in S3.
    pub archived: Option<i64>,
    pub lag: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ArchiveReport {
    pub group: String,
    pub lag: i64,
    pub partitions: Vec<ArchivePartition>,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct AppMetricaReport {
    pub done: usize,
    pub running: usize,
    pub pending: usize,
    pub failed: usize,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Report {
    pub verdict: Verdict,
    pub checked_at: DateTime<Utc>,
    pub group: String,
    /// Why the DWH could not be read, if it could not.
    pub dwh_error: Option<String>,
    /// Why the broker could not be asked, if it could not.
    pub kafka_error: Option<String>,
    /// Why the topics' ids could not be read, if they could not: whether the
    /// stored offsets count in the topic now on the broker was not checked.
    pub topic_ids_error: Option<String>,
    pub tables: Vec<TableReport>,
    pub archive: Option<ArchiveReport>,
    pub appmetrica: Option<AppMetricaReport>,
    /// The group's last executed replays, newest first.
    pub replays: Vec<ReplayRecord>,
    /// The group's last gaps in its offsets (records moved past without being
    /// written, offsets moved back), newest first, from `dwh_offset_gaps`.
    pub gaps: Vec<StoredGap>,
    /// Other consumer groups whose instances ingest into this DWH now: another
    /// deployment, each writing every record of the tables both read.
    pub other_groups: Vec<OtherGroup>,
}

/// Replays shown by `status`.
const REPLAYS_SHOWN: i64 = 3;

/// Offset gaps shown by `status`.
const GAPS_SHOWN: i64 = 10;

/// What the DWH says.
#[derive(Debug, Default)]
struct DwhView {
    offsets: Vec<StoredOffset>,
    rejects: HashMap<Table, RejectCounts>,
    rows: HashMap<Table, i64>,
    appmetrica: Option<AppMetricaReport>,
    replays: Vec<ReplayRecord>,
    gaps: Vec<StoredGap>,
    other_groups: Vec<OtherGroup>,
}

async fn read_dwh(config: &Config, dwh: &Dwh) -> Result<DwhView, String> {
    let mut view = DwhView {
        offsets: dwh
            .stored_offsets(&config.kafka.group_id)
            .await
            .map_err(|e| e.to_string())?,
        rejects: dwh.reject_counts().await.map_err(|e| e.to_string())?,
        replays: dwh
            .replays(&config.kafka.group_id, REPLAYS_SHOWN)
            .await
            .map_err(|e| e.to_string())?,
        gaps: dwh
            .offset_gaps(&config.kafka.group_id, GAPS_SHOWN)
            .await
            .map_err(|e| e.to_string())?,
        other_groups: dwh
            .other_groups(&config.kafka.group_id, crate::ingest::ANNOUNCE_FRESH)
            .await
            .map_err(|e| e.to_string())?,
        ..DwhView::default()
    };
    for table in Table::ALL {
        view.rows
            .insert(table, dwh.count_rows(table.name()).await.map_err(|e| e.to_string())?);
    }
    if let Some(application) = config.appmetrica.application_id {
        let windows = dwh.windows(application).await.map_err(|e| e.to_string())?;
        let mut report = AppMetricaReport::default();
        for w in &windows {
            match w.status.as_str() {
                "done" => report.done += 1,
                "running" => report.running += 1,
                "failed" => report.failed += 1,
                _ => report.pending += 1,
            }
        }
        report.last_error = windows
            .iter()
            .filter(|w| w.error.is_some())
            .max_by_key(|w| w.fetched_at)
            .and_then(|w| w.error.clone());
        view.appmetrica = Some(report);
    }
    Ok(view)
}

/// Gathers the report. `ingest` is this process's ingest role, when it runs one.
pub async fn gather(config: &Config, dwh: &Dwh, ingest: Option<&IngestStatus>) -> Report {
    let archive_group = config.s3.is_configured().then(|| crate::archive::group_id(config));
    let broker = match config.kafka.bootstrap_servers {
        None => Err("KAFKA_BOOTSTRAP_SERVERS is not set".to_owned()),
        Some(_) => {
            let (config, group) = (config.clone(), archive_group.clone());
            tokio::task::spawn_blocking(move || read_broker(&config, group.as_deref(), Stalls::Read))
                .await
                .unwrap_or_else(|e| Err(format!("the broker query failed: {e}")))
        }
    };
    let stored = read_dwh(config, dwh).await;
    assemble(config, stored, broker, archive_group, ingest)
}

fn assemble(
    config: &Config,
    dwh: Result<DwhView, String>,
    broker: Result<BrokerView, String>,
    archive_group: Option<String>,
    ingest: Option<&IngestStatus>,
) -> Report {
    let (dwh_view, dwh_error) = match dwh {
        Ok(view) => (view, None),
        Err(e) => (DwhView::default(), Some(e)),
    };
    let (broker_view, kafka_error) = match broker {
        Ok(view) => (view, None),
        Err(e) => (BrokerView::default(), Some(e)),
    };
    let failing_now: HashMap<String, String> = ingest.map(IngestStatus::failing_topics).unwrap_or_default();
    let mut tables = Vec::new();
    let mut archive_partitions = Vec::new();
    for table in Table::ALL {
        let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
        let stored: HashMap<i32, &StoredOffset> = dwh_view
            .offsets
            .iter()
            .filter(|o| o.topic == topic)
            .map(|o| (o.partition, o))
            .collect();
        let marks = broker_view.watermarks.get(&topic).cloned().unwrap_or_default();
        let partitions: Vec<PartitionReport> = marks
            .iter()
            .map(|&(partition, range)| {
                let record = stored.get(&partition).copied();
                let at = record.map(|o| o.next_offset);
                let fresh = broker_view.fresh_from.get(&(topic.clone(), partition));
                PartitionReport {
                    partition,
                    stored: at,
                    low: range.0,
                    high: range.1,
                    lag: lag(at, range),
                    problem: misfit(
                        at,
                        range,
                        (
                            record.and_then(|o| o.topic_id.as_deref()),
                            broker_view.topic_ids.get(&topic).map(String::as_str),
                        ),
                    ),
                    stalled: stalled(record, range, fresh, config),
                }
            })
            .collect();
        for &(partition, range) in &marks {
            if archive_group.is_some() {
                let archived = broker_view.archived.get(&(topic.clone(), partition)).copied();
                archive_partitions.push(ArchivePartition {
                    table,
                    partition,
                    archived,
                    lag: lag(archived, range),
                });
            }
        }
        tables.push(TableReport {
            table,
            rows: dwh_error
                .is_none()
                .then(|| dwh_view.rows.get(&table).copied().unwrap_or(0)),
            rejects: dwh_error
                .is_none()
                .then(|| dwh_view.rejects.get(&table).copied().unwrap_or_default()),
            last_batch_at: stored.values().map(|o| o.updated_at).max(),
            lag: partitions.iter().map(|p| p.lag).sum(),
            failing: failing_now.get(&topic).cloned(),
            partitions,
            topic,
        });
    }
    let archive = archive_group.map(|group| ArchiveReport {
        group,
        lag: archive_partitions.iter().map(|p| p.lag).sum(),
        partitions: archive_partitions,
    });
    let verdict = verdict(&tables, dwh_error.as_deref(), kafka_error.as_deref());
    Report {
        verdict,
        checked_at: Utc::now(),
        group: config.kafka.group_id.clone(),
        dwh_error,
        kafka_error,
        topic_ids_error: broker_view.topic_ids_error.clone(),
        tables,
        archive,
        appmetrica: dwh_view.appmetrica,
        replays: dwh_view.replays,
        gaps: dwh_view.gaps,
        other_groups: dwh_view.other_groups,
    }
}

fn verdict(tables: &[TableReport], dwh_error: Option<&str>, kafka_error: Option<&str>) -> Verdict {
    let mut why = Vec::new();
    if let Some(e) = dwh_error {
        why.push(format!("DWH: {e}"));
    }
    if let Some(e) = kafka_error {
        why.push(format!("Kafka: {e}"));
    }
    for t in tables {
        if let Some(cause) = &t.failing {
            why.push(format!("{}: {cause}", t.table));
        }
        for p in &t.partitions {
            if let Some(problem) = &p.problem {
                why.push(format!("{} partition {}: {problem}", t.table, p.partition));
            }
        }
    }
    if !why.is_empty() {
        return Verdict {
            state: State::Failing,
            summary: format!("failing: {}", why.join("; ")),
        };
    }
    let stalls: Vec<String> = tables
        .iter()
        .flat_map(|t| {
            t.partitions.iter().filter_map(move |p| {
                Some(format!(
                    "{} partition {}: {}",
                    t.table,
                    p.partition,
                    p.stalled.as_ref()?
                ))
            })
        })
        .collect();
    if !stalls.is_empty() {
        return Verdict {
            state: State::Stalled,
            summary: format!("stalled: {}", stalls.join("; ")),
        };
    }
    let total: i64 = tables.iter().map(|t| t.lag).sum();
    if total == 0 {
        return Verdict {
            state: State::CaughtUp,
            summary: "all caught up".into(),
        };
    }
    let behind: Vec<String> = tables
        .iter()
        .filter(|t| t.lag > 0)
        .map(|t| format!("{} {}", t.table, t.lag))
        .collect();
    Verdict {
        state: State::Lagging,
        summary: format!("lagging: {total} records not yet in the DWH ({})", behind.join(", ")),
    }
}

impl Report {
    /// The report as a table for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "group {}    checked {}",
            self.group,
            self.checked_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
        if let Some(e) = &self.dwh_error {
            let _ = writeln!(out, "DWH: {e}");
        }
        if let Some(e) = &self.kafka_error {
            let _ = writeln!(out, "Kafka: {e}");
        }
        if let Some(e) = &self.topic_ids_error {
            let _ = writeln!(
                out,
                "note: the topics' ids could not be read ({e}): whether the stored offsets count in the topics \
                 now on the broker was not checked, only their watermarks"
            );
        }
        let _ = writeln!(
            out,
            "\nTABLE                           ROWS   REJECTS (24 H)        LAG  LAST BATCH (UTC)"
        );
        for t in &self.tables {
            let _ = writeln!(
                out,
                "{:<26} {:>9} {:>16} {:>10}  {}{}",
                t.table.name(),
                dash(t.rows.map(|r| r.to_string())),
                dash(t.rejects.map(|r| format!("{} ({})", r.total, r.last_24h))),
                t.lag,
                dash(t.last_batch_at.map(|at| at.format("%Y-%m-%d %H:%M:%S").to_string())),
                t.failing
                    .as_deref()
                    .map(|f| format!("  FAILING: {f}"))
                    .unwrap_or_default(),
            );
            for p in &t.partitions {
                let _ = writeln!(
                    out,
                    "  partition {:<5} stored {:<12} log {}..{:<14} lag {}{}",
                    p.partition,
                    dash(p.stored.map(|s| s.to_string())),
                    p.low,
                    p.high,
                    p.lag,
                    p.problem
                        .as_deref()
                        .map(|x| format!("  PROBLEM: {x}"))
                        .or_else(|| p.stalled.as_deref().map(|x| format!("  STALLED: {x}")))
                        .unwrap_or_default(),
                );
            }
        }
        if let Some(archive) = &self.archive {
            let _ = writeln!(
                out,
                "\narchive group {}: {} records not yet archived",
                archive.group, archive.lag
            );
            for p in archive.partitions.iter().filter(|p| p.lag > 0) {
                let _ = writeln!(
                    out,
                    "  {} partition {}: archived to {}, lag {}",
                    p.table,
                    p.partition,
                    dash(p.archived.map(|a| a.to_string())),
                    p.lag
                );
            }
        }
        if let Some(a) = &self.appmetrica {
            let _ = writeln!(
                out,
                "\nAppMetrica windows: {} done, {} running, {} pending, {} failed{}",
                a.done,
                a.running,
                a.pending,
                a.failed,
                a.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        for (i, r) in self.replays.iter().enumerate() {
            let reread: i64 = r
                .plan
                .iter()
                .filter_map(|p| Some(p.current? - p.new))
                .filter(|n| *n > 0)
                .sum();
            let _ = writeln!(
                out,
                "{}{} replay: {} by {} at {} ({} partition(s), {reread} record(s) to read again)",
                if i == 0 { "\n" } else { "" },
                if i == 0 { "last" } else { "earlier" },
                r.scenario,
                r.executed_by,
                r.executed_at.format("%Y-%m-%d %H:%M:%S UTC"),
                r.plan.len()
            );
        }
        for other in &self.other_groups {
            let _ = writeln!(
                out,
                "\nWARNING: group {} also ingests into this DWH ({}; {} instance(s)): each group writes every \
                 record of the tables both read; a KAFKA_GROUP_ID change moves the offsets with replay",
                other.group,
                other.tables.join(", "),
                other.members.len()
            );
        }
        for (i, g) in self.gaps.iter().enumerate() {
            let table = self
                .tables
                .iter()
                .find(|t| t.topic == g.topic)
                .map_or(g.topic.as_str(), |t| t.table.name());
            let what = match g.cause.as_str() {
                "log behind" => format!(
                    "offset moved back from {} to {} (the log ended before it)",
                    g.from_offset, g.to_offset
                ),
                cause => format!(
                    "records {}..{} ({}) never written: {}",
                    g.from_offset,
                    g.to_offset,
                    g.records,
                    if cause == "retention" {
                        "lost to retention"
                    } else {
                        "skipped as KAFKA_ON_OFFSET_OUT_OF_RANGE asked"
                    }
                ),
            };
            let _ = writeln!(
                out,
                "{}gap: {table} partition {}: {what}, at {}",
                if i == 0 { "\n" } else { "" },
                g.partition,
                g.noted_at.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
        let _ = writeln!(out, "\n{}", self.verdict.summary);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_ids_that_could_not_be_read_are_said_and_fail_nothing() {
        let config = Config::from_vars(Vec::new()).expect("defaults");
        let broker = BrokerView {
            topic_ids_error: Some("DescribeTopics failed: timed out".into()),
            ..BrokerView::default()
        };
        let report = assemble(&config, Ok(DwhView::default()), Ok(broker), None, None);
        assert_eq!(
            report.topic_ids_error.as_deref(),
            Some("DescribeTopics failed: timed out")
        );
        assert_ne!(report.verdict.state, State::Failing, "{:?}", report.verdict);
        let text = report.render();
        assert!(
            text.contains("note: the topics' ids could not be read (DescribeTopics failed: timed out)"),
            "{text}"
        );
    }

    #[test]
    fn lag_counts_from_the_stored_offset_or_the_first_record_held() {
        assert_eq!(lag(Some(10), (0, 15)), 5);
        assert_eq!(lag(Some(15), (0, 15)), 0);
        assert_eq!(lag(None, (3, 15)), 12);
        assert_eq!(lag(Some(1), (5, 15)), 10, "records below low are gone, not lag");
        assert_eq!(lag(Some(20), (0, 15)), 0);
        let unknown = (None, None);
        assert!(misfit(Some(20), (0, 15), unknown).unwrap().contains("past the end"));
        assert!(misfit(Some(1), (5, 15), unknown).unwrap().contains("1..5 are gone"));
        assert_eq!(misfit(Some(15), (0, 15), unknown), None);
        assert_eq!(misfit(None, (5, 15), unknown), None);
        // Inside the log, but of another one: the topic was created again.
        let other = misfit(Some(10), (0, 15), (Some("OLD"), Some("NEW"))).unwrap();
        assert!(
            other.contains("counts in topic id OLD, but the broker's topic is topic id NEW")
                && other.contains("--adopt-topic"),
            "{other}"
        );
        assert_eq!(misfit(Some(10), (0, 15), (Some("NEW"), Some("NEW"))), None);
        assert_eq!(
            misfit(Some(10), (0, 15), (None, Some("NEW"))),
            None,
            "a row of an older release"
        );
    }
}
