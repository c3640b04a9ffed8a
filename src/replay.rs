//! Replay: moving where a table's ingest reads next, in the DWH's offset rows
//! (the truth ingest starts from), with the scenarios of
//! `kafka-consumer-groups --reset-offsets`.
//!
//! This module decides the plan from what the broker and the DWH answered; it
//! talks to neither. `cli/replay.rs` asks them, prints the plan and executes it.

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rdkafka::Offset;

use crate::catalogue::Table;
use crate::store::{PlannedOffset, TopicIdentity};

/// Where to move each partition in scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    ToEarliest,
    ToLatest,
    ToOffset(i64),
    ShiftBy(i64),
    /// The first record at or after the time (`--to-datetime`, `--by-duration`).
    ToDatetime(DateTime<Utc>),
    /// Offsets from a plan file, by topic and partition.
    FromFile(HashMap<(String, i32), i64>),
}

/// A partition in scope, as the broker and the DWH see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub table: Table,
    pub topic: String,
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    /// The DWH's stored next offset, if the group wrote this partition.
    pub current: Option<i64>,
    /// Where ingest starts with no stored offset (`KAFKA_AUTO_OFFSET_RESET`).
    pub start: i64,
    /// The log the broker's topic is (its id and cluster), when it gives one:
    /// the offsets of the plan count in it.
    pub log: Option<TopicIdentity>,
}

impl Position {
    /// Where ingest reads next today.
    pub fn reads_from(&self) -> i64 {
        self.current.unwrap_or(self.start)
    }
}

/// The plan for one partition, with what the operator should know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub position: Position,
    pub new: i64,
    pub warnings: Vec<String>,
}

impl Step {
    /// Records read again (positive) or skipped (negative) once executed.
    pub fn change(&self) -> i64 {
        self.position.reads_from() - self.new
    }

    pub fn planned(&self) -> PlannedOffset {
        PlannedOffset {
            table: self.position.table.name().to_owned(),
            topic: self.position.topic.clone(),
            partition: self.position.partition,
            current: self.position.current,
            new: self.new,
            topic_id: self.position.log.as_ref().map(|l| l.topic_id.clone()),
            cluster_id: self.position.log.as_ref().and_then(|l| l.cluster_id.clone()),
        }
    }
}

/// The new offset of `position` under `scenario`, clamped into the log.
/// `by_time` is the broker's answer to ListOffsets by timestamp for this
/// partition (only for [`Scenario::ToDatetime`]). `None` when a plan file
/// leaves the partition out.
pub fn step(scenario: &Scenario, position: Position, by_time: Option<Offset>) -> Result<Option<Step>, String> {
    let mut warnings = Vec::new();
    let wanted = match scenario {
        Scenario::ToEarliest => position.low,
        Scenario::ToLatest => position.high,
        Scenario::ToOffset(n) => *n,
        Scenario::ShiftBy(n) => position.reads_from().saturating_add(*n),
        Scenario::ToDatetime(at) => match by_time {
            Some(Offset::Offset(o)) => o,
            // Kafka answers -1 when no record is at or after the time.
            Some(Offset::End) | None => {
                warnings.push(format!(
                    "{} partition {}: no record at or after {}: moved to the high watermark {}",
                    position.topic,
                    position.partition,
                    at.to_rfc3339(),
                    position.high
                ));
                position.high
            }
            Some(other) => {
                return Err(format!(
                    "{} partition {}: the broker answered {other:?} for {}",
                    position.topic,
                    position.partition,
                    at.to_rfc3339()
                ))
            }
        },
        Scenario::FromFile(offsets) => match offsets.get(&(position.topic.clone(), position.partition)) {
            Some(&o) => o,
            None => return Ok(None),
        },
    };
    let new = if wanted < position.low {
        warnings.push(format!(
            "{} partition {}: offset {wanted} is below the low watermark {}: clamped to {}",
            position.topic, position.partition, position.low, position.low
        ));
        position.low
    } else if wanted > position.high {
        warnings.push(format!(
            "{} partition {}: offset {wanted} is above the high watermark {}: clamped to {}",
            position.topic, position.partition, position.high, position.high
        ));
        position.high
    } else {
        wanted
    };
    Ok(Some(Step {
        position,
        new,
        warnings,
    }))
}

/// Whether `topic`'s stored offsets move to a new log. `stored`: the logs its
/// offset rows were written for; `found`: the broker's. When they differ (the
/// topic deleted and created again, or the cluster replaced) the offsets count
/// nothing in the broker's log, so a replay is refused unless the operator
/// adopts the new log (`adopt`); adopting answers true. Adopting a log the
/// offsets already count, or that the DWH never counted in, changes nothing.
pub fn adopts(
    topic: &str,
    stored: &[TopicIdentity],
    found: Option<&TopicIdentity>,
    adopt: bool,
) -> Result<bool, String> {
    let Some(found) = found else {
        if adopt {
            return Err(format!(
                "--adopt-topic: the broker gives no topic id for {topic} (Kafka before 2.8?), so there is no \
                 log to tell from another; move its offsets with a plain replay"
            ));
        }
        return Ok(false);
    };
    let other: Vec<String> = stored
        .iter()
        .filter(|s| s.topic_id != found.topic_id)
        .map(ToString::to_string)
        .collect();
    if other.is_empty() {
        return Ok(false);
    }
    if !adopt {
        return Err(format!(
            "{topic}: the DWH's offsets count {}, but the broker's topic is {found}: the topic was deleted and \
             created again, or the cluster replaced, and those offsets count nothing in it; add --adopt-topic to \
             move the offsets to the new topic (with --to-earliest, to read it from its first record)",
            other.join(", ")
        ));
    }
    Ok(true)
}

/// Reads a plan file: `topic,partition,offset` per line, the format
/// `kafka-consumer-groups --reset-offsets --export` writes. Blank lines and
/// lines starting with `#` are skipped. Errors name the line.
pub fn parse_plan_file(text: &str) -> Result<HashMap<(String, i32), i64>, String> {
    let mut offsets = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what} (expected topic,partition,offset): {line:?}", n + 1);
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [topic, partition, offset] = fields[..] else {
            return Err(bad("not three fields"));
        };
        if topic.is_empty() {
            return Err(bad("no topic"));
        }
        let partition: i32 = partition.parse().map_err(|_| bad("the partition is not a number"))?;
        let offset: i64 = offset.parse().map_err(|_| bad("the offset is not a number"))?;
        if partition < 0 || offset < 0 {
            return Err(bad("negative partition or offset"));
        }
        if offsets.insert((topic.to_owned(), partition), offset).is_some() {
            return Err(bad("the partition is listed twice"));
        }
    }
    if offsets.is_empty() {
        return Err("the plan file lists no partition".into());
    }
    Ok(offsets)
}

/// Writes a plan in the format [`parse_plan_file`] reads.
pub fn plan_file(steps: &[Step]) -> String {
    let mut out = String::new();
    for s in steps {
        let _ = writeln!(out, "{},{},{}", s.position.topic, s.position.partition, s.new);
    }
    out
}

/// The plan as a table a person reads.
pub fn render(steps: &[Step]) -> String {
    let mut out = format!(
        "{:<26} {:>9} {:>12} {:>12} {:>12} {:>12} {:>10}\n",
        "TABLE", "PARTITION", "CURRENT", "NEW", "LOW", "HIGH", "RE-READ"
    );
    for s in steps {
        let p = &s.position;
        let current = p.current.map_or_else(|| format!("- ({})", p.start), |c| c.to_string());
        let change = match s.change() {
            0 => "0".to_owned(),
            c if c > 0 => c.to_string(),
            c => format!("skip {}", -c),
        };
        let _ = writeln!(
            out,
            "{:<26} {:>9} {:>12} {:>12} {:>12} {:>12} {:>10}",
            p.table.name(),
            p.partition,
            current,
            s.new,
            p.low,
            p.high,
            change
        );
    }
    let reread: i64 = steps.iter().map(|s| s.change().max(0)).sum();
    let skipped: i64 = steps.iter().map(|s| (-s.change()).max(0)).sum();
    let _ = writeln!(
        out,
        "{} partition(s): {reread} record(s) to read again, {skipped} to skip",
        steps.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(current: Option<i64>) -> Position {
        Position {
            table: Table::EventsPart,
            topic: "dwh.events_part".into(),
            partition: 1,
            low: 10,
            high: 100,
            current,
            start: 10,
            log: None,
        }
    }

    fn log(id: &str) -> TopicIdentity {
        TopicIdentity {
            topic_id: id.into(),
            cluster_id: Some("c1".into()),
        }
    }

    #[test]
    fn offsets_of_another_log_are_moved_only_when_the_operator_adopts_it() {
        let (old, new) = (log("AAAA"), log("BBBB"));
        // The same log, or one the DWH never counted in: nothing to adopt.
        assert_eq!(adopts("t", std::slice::from_ref(&new), Some(&new), false), Ok(false));
        assert_eq!(adopts("t", &[], Some(&new), true), Ok(false));
        // Another log: refused, naming both, unless adopted.
        let refused = adopts("t", std::slice::from_ref(&old), Some(&new), false).unwrap_err();
        assert!(
            refused.contains("count topic id AAAA (cluster c1), but the broker's topic is topic id BBBB")
                && refused.contains("--adopt-topic"),
            "{refused}"
        );
        assert_eq!(adopts("t", &[old.clone(), new.clone()], Some(&new), true), Ok(true));
        // No topic id on the broker: nothing to tell logs by.
        assert_eq!(adopts("t", std::slice::from_ref(&old), None, false), Ok(false));
        assert!(adopts("t", &[old], None, true).unwrap_err().contains("no topic id"));
    }

    fn new_offset(scenario: &Scenario, current: Option<i64>, by_time: Option<Offset>) -> (i64, usize) {
        let s = step(scenario, position(current), by_time).unwrap().unwrap();
        (s.new, s.warnings.len())
    }

    #[test]
    fn each_scenario_moves_to_its_offset() {
        assert_eq!(new_offset(&Scenario::ToEarliest, Some(50), None), (10, 0));
        assert_eq!(new_offset(&Scenario::ToLatest, Some(50), None), (100, 0));
        assert_eq!(new_offset(&Scenario::ToOffset(42), Some(50), None), (42, 0));
        assert_eq!(new_offset(&Scenario::ShiftBy(-20), Some(50), None), (30, 0));
        assert_eq!(new_offset(&Scenario::ShiftBy(5), Some(50), None), (55, 0));
        // No stored offset: the shift starts where ingest would start.
        assert_eq!(new_offset(&Scenario::ShiftBy(5), None, None), (15, 0));
    }

    #[test]
    fn offsets_outside_the_log_are_clamped_with_a_warning() {
        assert_eq!(new_offset(&Scenario::ToOffset(3), Some(50), None), (10, 1));
        assert_eq!(new_offset(&Scenario::ToOffset(500), Some(50), None), (100, 1));
        assert_eq!(new_offset(&Scenario::ShiftBy(-1000), Some(50), None), (10, 1));
        assert_eq!(new_offset(&Scenario::ShiftBy(i64::MAX), Some(50), None), (100, 1));
        let s = step(&Scenario::ToOffset(3), position(Some(50)), None).unwrap().unwrap();
        assert!(s.warnings[0].contains("below the low watermark 10"), "{:?}", s.warnings);
    }

    /// Recorded answers of a broker to ListOffsets by timestamp (librdkafka maps
    /// Kafka's -1, "no such record", to `Offset::End`).
    #[test]
    fn a_time_resolves_to_the_brokers_offset_or_the_high_watermark() {
        let at = Scenario::ToDatetime("2026-11-26T10:00:00Z".parse().unwrap());
        assert_eq!(new_offset(&at, Some(50), Some(Offset::Offset(37))), (37, 0));
        let s = step(&at, position(Some(50)), Some(Offset::End)).unwrap().unwrap();
        assert_eq!(s.new, 100);
        assert!(
            s.warnings[0].contains("no record at or after 2026-11-26T10:00:00+00:00"),
            "{:?}",
            s.warnings
        );
        // An answer below the low watermark (retention ran meanwhile) is clamped.
        assert_eq!(new_offset(&at, Some(50), Some(Offset::Offset(2))), (10, 1));
        assert!(step(&at, position(Some(50)), Some(Offset::Invalid)).is_err());
    }

    #[test]
    fn a_plan_file_round_trips_and_leaves_other_partitions_out() {
        let steps = vec![step(&Scenario::ToOffset(42), position(Some(50)), None)
            .unwrap()
            .unwrap()];
        let text = plan_file(&steps);
        assert_eq!(text, "dwh.events_part,1,42\n");
        let offsets = parse_plan_file(&format!("# exported\n\n{text}")).unwrap();
        let scenario = Scenario::FromFile(offsets);
        assert_eq!(new_offset(&scenario, Some(50), None), (42, 0));
        let mut other = position(Some(50));
        other.partition = 2;
        assert_eq!(step(&scenario, other, None).unwrap(), None);
    }

    #[test]
    fn a_bad_plan_file_names_the_line() {
        for (text, expected) in [
            ("dwh.events_part,1\n", "line 1: not three fields"),
            ("a,1,2\ndwh.events_part,x,3\n", "line 2: the partition is not a number"),
            ("dwh.events_part,1,-3\n", "line 1: negative"),
            ("t,1,2\nt,1,3\n", "line 2: the partition is listed twice"),
            ("# nothing\n", "lists no partition"),
        ] {
            let err = parse_plan_file(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_plan_shows_reads_and_skips() {
        let back = step(&Scenario::ToOffset(20), position(Some(50)), None)
            .unwrap()
            .unwrap();
        let mut ahead_pos = position(None);
        ahead_pos.partition = 2;
        let ahead = step(&Scenario::ToLatest, ahead_pos, None).unwrap().unwrap();
        assert_eq!(back.change(), 30);
        assert_eq!(ahead.change(), -90);
        let text = render(&[back, ahead]);
        assert!(text.contains("skip 90"), "{text}");
        assert!(text.contains("- (10)"), "{text}");
        assert!(
            text.contains("2 partition(s): 30 record(s) to read again, 90 to skip"),
            "{text}"
        );
    }
}
