//! Admission: the one set of rules a record meets before it becomes a row,
//! whether it comes from a topic (the ingest) or from the API
//! (`POST /dwh/<table>`), in this order:
//! 1. its text is at most `limit` bytes;
//! 2. it decodes into a row of its table ([`super::decode_bytes`]);
//! 3. the row is at most `limit` bytes in memory ([`super::Row::approx_bytes`]);
//! 4. its event dates are inside the accepted window ([`DateWindow::check`]).
//!
//! A refusal is a [`RecordError`] naming what is wrong: the ingest rejects the
//! record with it, the API answers 422 with it. [`in_parallel`] shares a batch
//! of records between threads, in order.

use super::{decode_bytes, DateWindow, RecordError, Row, Table};

/// Admits a record's text (a Kafka record value) into a row of `table`.
pub fn admit(
    table: Table,
    payload: &[u8],
    limit: usize,
    window: &DateWindow,
    today: chrono::NaiveDate,
) -> Result<Row, RecordError> {
    if payload.len() > limit {
        return Err(RecordError::TooLarge {
            size: payload.len(),
            limit,
        });
    }
    admit_row(table, decode_bytes(table, payload)?.row, limit, window, today)
}

/// The rules after decoding (3 and 4), for a row decoded some other way (the
/// API decodes from its parsed JSON when the record needs a schema check).
pub fn admit_row(
    table: Table,
    row: Row,
    limit: usize,
    window: &DateWindow,
    today: chrono::NaiveDate,
) -> Result<Row, RecordError> {
    let size = row.approx_bytes();
    if size > limit {
        return Err(RecordError::TooLarge { size, limit });
    }
    window.check(table, &row, today)?;
    Ok(row)
}

/// Threads a batch of records may be decoded on: the machine's cores (ingest
/// deliveries and POST bodies alike).
pub fn decoder_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// `f` of every item (with its index), in order: the items are split into up to
/// [`decoder_threads`] parts of at least `min_per_thread` items, run on rayon's
/// pool (the calling thread waits); too few to share run on the calling thread.
/// A part that panicked is an error (its message), not a lost part.
pub fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    min_per_thread: usize,
    f: impl Fn(usize, &T) -> R + Sync,
) -> Result<Vec<R>, String> {
    let threads = decoder_threads().min(items.len() / min_per_thread.max(1)).max(1);
    if threads == 1 {
        return Ok(items.iter().enumerate().map(|(i, item)| f(i, item)).collect());
    }
    let per_part = items.len().div_ceil(threads);
    let f = &f;
    let mut parts: Vec<Vec<R>> = (0..threads).map(|_| Vec::new()).collect();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rayon::scope(|scope| {
            for (n, (chunk, part)) in items.chunks(per_part).zip(parts.iter_mut()).enumerate() {
                scope.spawn(move |_| {
                    part.extend(chunk.iter().enumerate().map(|(i, item)| f(n * per_part + i, item)));
                });
            }
        });
    }))
    .map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a decoding thread panicked".to_owned())
    })?;
    Ok(parts.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::admit as decode;
    use super::*;

    #[test]
    fn in_parallel_keeps_the_order_and_the_indexes_and_names_a_panic() {
        let items: Vec<u64> = (0..10_000).collect();
        let out = in_parallel(&items, 64, |i, v| (i as u64, v * 2, std::thread::current().id())).expect("no panic");
        assert_eq!(out.len(), items.len());
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, &(index, double, _))| index == i as u64 && double == 2 * i as u64));
        if decoder_threads() > 1 {
            // Shared: on rayon's pool, while this thread waits.
            let here = std::thread::current().id();
            assert!(out.iter().all(|(_, _, t)| *t != here), "decoded on the pool");
        }
        // Too few to share: all on the calling thread.
        let few = in_parallel(&items[..100], 64, |_, _| std::thread::current().id()).expect("no panic");
        assert!(few.iter().all(|t| *t == std::thread::current().id()));
        assert_eq!(
            in_parallel(&[] as &[u8], 64, |_, v| *v).expect("empty"),
            Vec::<u8>::new()
        );
        if decoder_threads() > 1 {
            // A part's panic is an error, named.
            let last = items.len() - 1;
            let err = in_parallel(&items, 1, |i, _| assert!(i != last, "record {i} is cursed")).unwrap_err();
            assert_eq!(err, "record 9999 is cursed");
        }
    }

    #[test]
    fn decode_refuses_event_dates_outside_the_window() {
        let window = DateWindow::default();
        let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 26).expect("a date");
        let dated = |table: Table, date: &str| {
            let mut record = crate::sample::records(table, 1, 1).remove(0);
            record["event_date"] = serde_json::json!(date);
            record.to_string()
        };
        let ok = decode(
            Table::EventsPart,
            dated(Table::EventsPart, "2024-03-01").as_bytes(),
            8192,
            &window,
            today,
        );
        assert!(ok.is_ok(), "{ok:?}");
        for date in ["9999-01-01", "1999-12-31"] {
            let error = decode(
                Table::EventsPart,
                dated(Table::EventsPart, date).as_bytes(),
                8192,
                &window,
                today,
            )
            .unwrap_err()
            .to_string();
            assert!(
                error.starts_with(&format!(
                    "field \"event_date\": {date} is outside the accepted window 2000-01-01.."
                )),
                "{error}"
            );
            assert!(error.contains("DWH_EVENTS_MIN_DATE"), "{error}");
        }
        // Another table's dates are not windowed.
        let table = Table::TmpEventProperties;
        let ok = decode(table, dated(table, "9999-01-01").as_bytes(), 8192, &window, today);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn decode_refuses_oversized_records_by_raw_and_decoded_size() {
        let record = br#"{"uuid":"5d8e2f86-2a1f-4a4e-9a0b-4c1f1c2b7a10","application_id":1}"#;
        let limit = record.len() - 1;
        assert_eq!(
            decode(
                Table::UserLocations,
                record,
                limit,
                &DateWindow::default(),
                chrono::NaiveDate::MIN
            )
            .unwrap_err()
            .to_string(),
            format!("record is {} bytes, over the limit of {limit} bytes", record.len())
        );
        assert_eq!(
            decode(
                Table::UserLocations,
                b"",
                1024,
                &DateWindow::default(),
                chrono::NaiveDate::MIN
            )
            .unwrap_err(),
            RecordError::Empty,
            "a tombstone is rejected, not dropped"
        );
        assert!(matches!(
            decode(
                Table::UserLocations,
                b"\xff{}",
                1024,
                &DateWindow::default(),
                chrono::NaiveDate::MIN
            ),
            Err(RecordError::NotUtf8(0))
        ));
    }
}
