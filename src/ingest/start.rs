//! Where each assigned partition starts reading. Pure: no I/O.
//!
//! Guarantees: the offset stored in the DWH wins, but only while it fits the log
//! (between the low and high watermarks). A stored offset above the high watermark
//! (the topic was recreated, the cluster migrated) or below the low watermark
//! (records expired before they were read) is never skipped silently: the table
//! stops with a [`Misfit`] naming both offsets, unless the operator asked for a
//! reset with `KAFKA_ON_OFFSET_OUT_OF_RANGE`. With no stored offset the DWH holds
//! nothing of the partition: it starts from the Kafka committed offset when
//! `KAFKA_ADOPT_COMMITTED_OFFSETS` says so; else, when the DWH holds other
//! partitions of the topic (a partition added since, or one that never had a
//! record), from its first record, whatever `KAFKA_AUTO_OFFSET_RESET` says: that
//! setting is for a topic the DWH has never read.
//!
//! Offsets count records in one log. Each offset row keeps the identity of the
//! log it was written for (the topic id of KIP-516 and the cluster id); a topic
//! whose id differs (deleted and created again, or the cluster replaced, under
//! the same name) stops the table with a [`Misfit::OtherLog`] naming both, even
//! when the old offsets fall inside the new log's range. Where the broker gives
//! no topic id (before Kafka 2.8), or the rows predate this check, only the
//! watermarks are checked.

use std::collections::HashMap;

use crate::config::{OffsetReset, OutOfRange};
use crate::store::TopicIdentity;

/// A partition's offsets on the broker: `low` is the first held, `high` one past
/// the last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub low: i64,
    pub high: i64,
}

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At this offset.
    Offset(i64),
    /// The first record the broker holds.
    Beginning,
    /// After the last record written.
    End,
}

/// Why a partition starts where it does (logged once per partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The offset stored in the DWH.
    Dwh,
    /// No DWH offset: the Kafka committed offset, adopted on request.
    KafkaCommitted,
    /// No DWH offset (and none adopted) for a partition of a topic the DWH
    /// holds other partitions of: read from its first record, so that the
    /// first records of a partition added to a known topic are not skipped.
    Unseen,
    /// No DWH offset of the topic at all (and none adopted): `KAFKA_AUTO_OFFSET_RESET`.
    Reset(OffsetReset),
    /// The stored offset did not fit the log and the operator asked to move it;
    /// the DWH offset must be moved from `stored` to the start before reading.
    Moved { stored: i64, to: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub at: StartAt,
    pub source: Source,
}

/// A stored offset that does not fit the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Misfit {
    #[error(
        "{topic}[{partition}]: the DWH stores next offset {stored}, above the high watermark {high} \
         (was the topic recreated?); nothing is read until an operator decides: restart with \
         KAFKA_ON_OFFSET_OUT_OF_RANGE=earliest to read the partition from its first record \
         ({low}), or latest to skip to {high}"
    )]
    AboveHigh {
        topic: String,
        partition: i32,
        stored: i64,
        low: i64,
        high: i64,
    },
    #[error(
        "{topic}[{partition}]: the DWH stores next offset {stored}, below the low watermark {low}: \
         records {stored}..{low} expired before they were written; nothing is read until an \
         operator decides: restore them from the S3 archive (dwh-helper archive restore), then \
         restart with KAFKA_ON_OFFSET_OUT_OF_RANGE=earliest to go on from {low}"
    )]
    BelowLow {
        topic: String,
        partition: i32,
        stored: i64,
        low: i64,
        high: i64,
    },
    #[error(
        "{topic}: the DWH's offsets count {stored}, but the broker's topic is {found}: it was deleted and \
         created again, or the cluster replaced, so those offsets count nothing in it and reading from them \
         would skip or repeat records; nothing is read until an operator decides: stop the instances, run \
         dwh-helper replay --table {table} --adopt-topic --to-earliest --execute (read the new topic from \
         its first record; any other scenario picks another start), then start them again"
    )]
    OtherLog {
        table: String,
        topic: String,
        stored: Box<TopicIdentity>,
        found: Box<TopicIdentity>,
    },
}

/// Checks that the offsets stored for `topic` (written for the logs
/// `stored`) count in the broker's log `found`. No check when either is not
/// known.
pub fn check_log(
    table: &str,
    topic: &str,
    stored: &[TopicIdentity],
    found: Option<&TopicIdentity>,
) -> Result<(), Misfit> {
    let Some(found) = found else { return Ok(()) };
    match stored.iter().find(|s| s.topic_id != found.topic_id) {
        None => Ok(()),
        Some(old) => Err(Misfit::OtherLog {
            table: table.to_owned(),
            topic: topic.to_owned(),
            stored: Box::new(old.clone()),
            found: Box::new(found.clone()),
        }),
    }
}

/// What the operator configured for starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub reset: OffsetReset,
    pub adopt_committed: bool,
    pub on_out_of_range: OutOfRange,
}

/// Decides where `partition` starts. `range` is `None` when the watermarks could
/// not be read: the stored offset is then trusted (a fetch out of range is caught
/// later as a consume error and decided again). `known`: the DWH stores offsets
/// of other partitions of the topic.
pub fn decide(
    topic: &str,
    partition: i32,
    stored: Option<i64>,
    committed: Option<i64>,
    range: Option<Range>,
    known: bool,
    policy: Policy,
) -> Result<Start, Misfit> {
    let Policy {
        reset,
        adopt_committed,
        on_out_of_range,
    } = policy;
    let Some(stored) = stored else {
        return Ok(match committed.filter(|_| adopt_committed) {
            Some(offset) => Start {
                at: StartAt::Offset(offset),
                source: Source::KafkaCommitted,
            },
            None if known => Start {
                at: StartAt::Beginning,
                source: Source::Unseen,
            },
            None => Start {
                at: match reset {
                    OffsetReset::Earliest => StartAt::Beginning,
                    OffsetReset::Latest => StartAt::End,
                },
                source: Source::Reset(reset),
            },
        });
    };
    let dwh = Start {
        at: StartAt::Offset(stored),
        source: Source::Dwh,
    };
    let Some(Range { low, high }) = range else {
        return Ok(dwh);
    };
    if (low..=high).contains(&stored) {
        return Ok(dwh);
    }
    let to = match on_out_of_range {
        OutOfRange::Earliest => low,
        OutOfRange::Latest => high,
        OutOfRange::Stop => {
            let (topic, partition) = (topic.to_owned(), partition);
            return Err(if stored > high {
                Misfit::AboveHigh {
                    topic,
                    partition,
                    stored,
                    low,
                    high,
                }
            } else {
                Misfit::BelowLow {
                    topic,
                    partition,
                    stored,
                    low,
                    high,
                }
            });
        }
    };
    Ok(Start {
        at: StartAt::Offset(to),
        source: Source::Moved { stored, to },
    })
}

/// One assigned partition's start, as [`plan`] decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub partition: i32,
    /// The stored next offset it starts from (after a move, where it was moved to).
    pub stored: Option<i64>,
    pub start: Start,
    /// The stored offset must first be moved in the DWH, `(from, to)`.
    pub moved: Option<(i64, i64)>,
}

/// Decides where every assigned partition starts, from its stored offset, the
/// Kafka committed offsets and the watermarks (a partition missing from `ranges`
/// trusts its stored offset). `known`: the DWH stores offsets of some partition
/// of the topic, assigned here or not. A partition whose stored offset does not
/// fit the log stops the table before any offset is moved.
pub fn plan(
    topic: &str,
    stored: &[(i32, Option<i64>)],
    known: bool,
    committed: &HashMap<i32, i64>,
    ranges: &HashMap<i32, Range>,
    policy: Policy,
) -> Result<Vec<Planned>, Misfit> {
    stored
        .iter()
        .map(|&(partition, stored)| {
            let start = decide(
                topic,
                partition,
                stored,
                committed.get(&partition).copied(),
                ranges.get(&partition).copied(),
                known,
                policy,
            )?;
            let (stored, moved) = match start.source {
                Source::Moved { stored, to } => (Some(to), Some((stored, to))),
                _ => (stored, None),
            };
            Ok(Planned {
                partition,
                stored,
                start,
                moved,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Option<Range> = Some(Range { low: 10, high: 100 });

    fn policy(reset: OffsetReset, adopt_committed: bool, on_out_of_range: OutOfRange) -> Policy {
        Policy {
            reset,
            adopt_committed,
            on_out_of_range,
        }
    }

    fn d(stored: Option<i64>, committed: Option<i64>, adopt: bool, out: OutOfRange) -> Result<Start, Misfit> {
        decide(
            "dwh.t",
            3,
            stored,
            committed,
            R,
            false,
            policy(OffsetReset::Earliest, adopt, out),
        )
    }

    #[test]
    fn a_stored_offset_within_the_log_wins_over_everything() {
        for stored in [10, 55, 100] {
            assert_eq!(
                d(Some(stored), Some(7), true, OutOfRange::Stop),
                Ok(Start {
                    at: StartAt::Offset(stored),
                    source: Source::Dwh
                })
            );
        }
    }

    #[test]
    fn without_a_stored_offset_the_reset_policy_applies_unless_kafka_offsets_are_adopted() {
        assert_eq!(
            d(None, Some(50), false, OutOfRange::Stop).unwrap(),
            Start {
                at: StartAt::Beginning,
                source: Source::Reset(OffsetReset::Earliest)
            },
            "a Kafka committed offset is not the DWH's: the DWH holds nothing of the partition"
        );
        assert_eq!(
            decide(
                "t",
                0,
                None,
                Some(50),
                R,
                false,
                policy(OffsetReset::Latest, false, OutOfRange::Stop)
            )
            .unwrap()
            .at,
            StartAt::End
        );
        assert_eq!(
            d(None, Some(50), true, OutOfRange::Stop).unwrap(),
            Start {
                at: StartAt::Offset(50),
                source: Source::KafkaCommitted
            }
        );
        assert_eq!(d(None, None, true, OutOfRange::Stop).unwrap().at, StartAt::Beginning);
    }

    #[test]
    fn a_partition_the_dwh_never_saw_of_a_topic_it_knows_starts_at_its_beginning_whatever_the_reset() {
        for reset in [OffsetReset::Latest, OffsetReset::Earliest] {
            let start = decide("t", 4, None, None, R, true, policy(reset, false, OutOfRange::Stop)).unwrap();
            assert_eq!(
                start,
                Start {
                    at: StartAt::Beginning,
                    source: Source::Unseen
                },
                "{reset:?}"
            );
        }
        // A topic the DWH never read follows the reset policy.
        let fresh = decide(
            "t",
            4,
            None,
            None,
            R,
            false,
            policy(OffsetReset::Latest, false, OutOfRange::Stop),
        );
        assert_eq!(fresh.unwrap().at, StartAt::End);
        // An adopted Kafka offset is the operator's explicit choice, and wins.
        let adopted = decide(
            "t",
            4,
            None,
            Some(7),
            R,
            true,
            policy(OffsetReset::Latest, true, OutOfRange::Stop),
        );
        assert_eq!(adopted.unwrap().source, Source::KafkaCommitted);
    }

    #[test]
    fn offsets_of_another_log_stop_the_table_naming_both_logs_and_the_command() {
        let log = |id: &str| TopicIdentity {
            topic_id: id.into(),
            cluster_id: Some("cluster-1".into()),
        };
        let (old, new) = (log("q1Sh-9_ISia_zwGINzRvyQ"), log("Vb0rQEXVTqK0cS6ZWXq3jA"));
        assert_eq!(check_log("t", "dwh.t", std::slice::from_ref(&new), Some(&new)), Ok(()));
        // Rows of an older release, or a broker without topic ids: no check.
        assert_eq!(check_log("t", "dwh.t", &[], Some(&new)), Ok(()));
        assert_eq!(check_log("t", "dwh.t", std::slice::from_ref(&old), None), Ok(()));
        let stop = check_log("user_locations", "dwh.user_locations", &[new.clone(), old], Some(&new))
            .unwrap_err()
            .to_string();
        assert!(
            stop.starts_with(
                "dwh.user_locations: the DWH's offsets count topic id q1Sh-9_ISia_zwGINzRvyQ (cluster cluster-1), \
                 but the broker's topic is topic id Vb0rQEXVTqK0cS6ZWXq3jA (cluster cluster-1)"
            ) && stop.contains("dwh-helper replay --table user_locations --adopt-topic --to-earliest --execute"),
            "{stop}"
        );
    }

    #[test]
    fn offsets_outside_the_log_stop_the_table_with_both_offsets_named() {
        let above = d(Some(101), None, false, OutOfRange::Stop).unwrap_err().to_string();
        assert!(
            above.starts_with("dwh.t[3]: the DWH stores next offset 101, above the high watermark 100"),
            "{above}"
        );
        assert!(above.contains("KAFKA_ON_OFFSET_OUT_OF_RANGE=earliest"), "{above}");
        let below = d(Some(9), None, false, OutOfRange::Stop).unwrap_err().to_string();
        assert!(
            below.starts_with("dwh.t[3]: the DWH stores next offset 9, below the low watermark 10"),
            "{below}"
        );
        assert!(below.contains("records 9..10 expired"), "{below}");
    }

    #[test]
    fn an_operator_reset_moves_the_stored_offset_to_a_watermark() {
        assert_eq!(
            d(Some(500), None, false, OutOfRange::Earliest).unwrap(),
            Start {
                at: StartAt::Offset(10),
                source: Source::Moved { stored: 500, to: 10 }
            }
        );
        assert_eq!(
            d(Some(2), None, false, OutOfRange::Latest).unwrap(),
            Start {
                at: StartAt::Offset(100),
                source: Source::Moved { stored: 2, to: 100 }
            }
        );
        // Within the log the request changes nothing.
        assert_eq!(
            d(Some(20), None, false, OutOfRange::Earliest).unwrap().source,
            Source::Dwh
        );
    }

    #[test]
    fn unknown_watermarks_trust_the_stored_offset() {
        assert_eq!(
            decide(
                "t",
                0,
                Some(1_000),
                None,
                None,
                false,
                policy(OffsetReset::Earliest, false, OutOfRange::Stop)
            )
            .unwrap()
            .at,
            StartAt::Offset(1_000)
        );
    }

    #[test]
    fn a_plan_moves_what_the_operator_asked_and_stops_before_any_move_on_a_misfit() {
        let ranges: HashMap<i32, Range> = [(0, Range { low: 10, high: 100 }), (1, Range { low: 10, high: 100 })].into();
        let committed: HashMap<i32, i64> = [(2, 42)].into();
        let stored = [(0, Some(50)), (1, Some(5)), (2, None), (3, Some(7))];
        let moving = policy(OffsetReset::Latest, true, OutOfRange::Earliest);
        let planned = plan("dwh.t", &stored, true, &committed, &ranges, moving).expect("a plan");
        let summary: Vec<_> = planned
            .iter()
            .map(|p| (p.partition, p.stored, p.start.at, p.moved))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, Some(50), StartAt::Offset(50), None),
                (1, Some(10), StartAt::Offset(10), Some((5, 10))),
                (2, None, StartAt::Offset(42), None),
                // No watermarks read: the stored offset is trusted.
                (3, Some(7), StartAt::Offset(7), None),
            ]
        );
        assert_eq!(planned[2].start.source, Source::KafkaCommitted);
        let stopping = policy(OffsetReset::Latest, true, OutOfRange::Stop);
        let misfit = plan("dwh.t", &stored, true, &committed, &ranges, stopping).unwrap_err();
        assert!(
            matches!(
                misfit,
                Misfit::BelowLow {
                    partition: 1,
                    stored: 5,
                    low: 10,
                    ..
                }
            ),
            "{misfit:?}"
        );
    }
}
